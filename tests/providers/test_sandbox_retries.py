"""The providers' documented callback retry schedules, as the sandbox holds them (providers.sandbox.retries)."""

from __future__ import annotations

import math

import pytest

from providers.sandbox import retries
from providers.sandbox.retries import MAILGUN, TWILIO, VONAGE, twilio_policy


def delay(
    policy: retries.RetryPolicy, attempt: int = 1, kind: str = "5xx", code: int | None = 500, **kw
) -> float | None:
    return policy.retry_delay(attempt=attempt, kind=kind, code=code, status=kw.get("status", "sent"), elapsed_s=0.0)


def test_vonage_backs_off_from_5_s_doubling_to_15_min_for_24_hours():
    assert VONAGE.delays_s[:9] == (5, 10, 20, 40, 80, 160, 320, 640, 900)
    assert set(VONAGE.delays_s[8:]) == {900}
    assert 24 * 3600 - 900 < math.fsum(VONAGE.delays_s) <= 24 * 3600
    assert delay(VONAGE, code=429, kind="4xx") == 5 and delay(VONAGE, kind="ct", code=None) == 5
    assert delay(VONAGE, code=404, kind="4xx") is None  # only 429 and 5xx answers are retried
    assert delay(VONAGE, attempt=len(VONAGE.delays_s) + 1) is None


def test_mailgun_retries_for_8_hours_stops_on_406_and_never_retries_delivered():
    assert MAILGUN.delays_s == (300, 600, 900, 3600, 7200, 14400)
    assert math.fsum(MAILGUN.delays_s) <= 8 * 3600
    assert delay(MAILGUN, code=404, kind="4xx", status="opened") == 300
    assert delay(MAILGUN, code=406, kind="4xx", status="opened") is None
    assert delay(MAILGUN, status="delivered") is None
    assert delay(MAILGUN, attempt=7, status="opened") is None


def test_twilio_by_default_retries_a_failed_connection_once_at_once():
    assert TWILIO is twilio_policy("")
    assert (TWILIO.delays_s, TWILIO.retry_on) == ((0.0,), frozenset({"ct"}))
    assert (TWILIO.connect_timeout_s, TWILIO.read_timeout_s, TWILIO.total_s) == (5.0, 15.0, 15.0)
    assert delay(TWILIO, kind="ct", code=None) == 0.0
    assert delay(TWILIO) is None and delay(TWILIO, kind="rt", code=None) is None
    assert delay(TWILIO, attempt=2, kind="ct", code=None) is None
    assert TWILIO.retry_delay(attempt=1, kind="ct", code=None, status="sent", elapsed_s=15.0) is None  # tt spent


@pytest.mark.parametrize(
    ("fragment", "rc", "retry_on", "ct_s"),
    [
        ("rc=3&rp=all", 3, {"ct", "rt", "4xx", "5xx"}, 5.0),
        ("rc=9&rp=5xx,rt&ct=50", 5, {"rt", "5xx"}, 0.1),  # clamped to Twilio's ranges
        ("rc=x&ct=2500", 1, {"ct"}, 2.5),
    ],
)
def test_twilio_connection_overrides_in_the_fragment(fragment, rc, retry_on, ct_s):
    policy = twilio_policy(fragment)
    assert (len(policy.delays_s), set(policy.retry_on), policy.connect_timeout_s) == (rc, retry_on, ct_s)
