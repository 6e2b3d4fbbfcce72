"""What a callback attempt's answer means and when it is tried again (messaging.callbacks.retries)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from messaging.callbacks.retries import (
    CONNECTION,
    DELIVERED,
    FINAL,
    HTTP_3XX,
    HTTP_4XX,
    HTTP_5XX,
    HTTP_429,
    RETRY,
    TIMEOUT,
    backoff_seconds,
    classify,
    next_attempt_at,
    retry_after_seconds,
)

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status):
    verdict = classify(status=status)
    assert (verdict.outcome, verdict.reason, verdict.endpoint_failing) == (DELIVERED, "", False)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (500, HTTP_5XX),
        (502, HTTP_5XX),
        (503, HTTP_5XX),
        (599, HTTP_5XX),
        (429, HTTP_429),
        (408, HTTP_4XX),
        (409, HTTP_4XX),
    ],
)
def test_5xx_408_409_and_429_are_retried_and_count_against_the_endpoint(status, reason):
    verdict = classify(status=status)
    assert (verdict.outcome, verdict.reason, verdict.endpoint_failing) == (RETRY, reason, True)


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, HTTP_4XX),
        (401, HTTP_4XX),
        (404, HTTP_4XX),
        (410, HTTP_4XX),
        (422, HTTP_4XX),
        (301, HTTP_3XX),
        (302, HTTP_3XX),
        (304, HTTP_3XX),
    ],
)
def test_other_4xx_and_3xx_are_final_and_do_not_open_the_circuit(status, reason):
    verdict = classify(status=status)
    assert (verdict.outcome, verdict.reason, verdict.endpoint_failing) == (FINAL, reason, False)


def test_no_answer_is_retried_as_timeout_or_connection_error():
    assert classify(status=None, error=TIMEOUT) == classify(status=None, error=TIMEOUT)
    assert (classify(status=None, error=TIMEOUT).outcome, classify(status=None, error=TIMEOUT).reason) == (
        RETRY,
        TIMEOUT,
    )
    refused = classify(status=None, error=CONNECTION)
    assert (refused.outcome, refused.reason, refused.endpoint_failing) == (RETRY, CONNECTION, True)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Sat, 01 Mar 2025 12:00:30 GMT", 30.0),
        ("Sat, 01 Mar 2025 11:00:00 GMT", 0.0),  # in the past: now
        ("", None),
        (None, None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),  # RFC 9110: delay-seconds is a whole number
    ],
)
def test_retry_after_is_seconds_or_an_http_date(value, seconds):
    assert retry_after_seconds(value, now=NOW) == seconds


def test_backoff_is_full_jitter_doubling_from_base_up_to_the_maximum():
    rng = random.Random(1)
    for attempts, ceiling in [(1, 5), (2, 10), (3, 20), (8, 640), (10, 2560), (11, 3600), (40, 3600), (500, 3600)]:
        waits = [backoff_seconds(attempts=attempts, base=5, maximum=3600, rng=rng) for _ in range(300)]
        assert 0 <= min(waits) and max(waits) <= ceiling
        assert max(waits) > ceiling * 0.8  # uniform over the whole range, not a fixed delay
        assert min(waits) < ceiling * 0.2


def test_next_attempt_inside_the_window():
    created = NOW - timedelta(hours=1)
    at = next_attempt_at(
        attempts=3,
        created_at=created,
        now=NOW,
        retry_after=None,
        base=5,
        maximum=3600,
        window=86400,
        rng=random.Random(2),
    )
    assert NOW <= at <= NOW + timedelta(seconds=20)


def test_retry_after_is_a_floor_capped_at_the_longest_backoff():
    kwargs = {"created_at": NOW, "now": NOW, "base": 5, "maximum": 3600, "window": 86400}
    at = next_attempt_at(attempts=1, retry_after=120, rng=random.Random(3), **kwargs)
    assert at == NOW + timedelta(seconds=120)  # the jittered wait (at most 5 s) is below the floor
    # A receiver asking for a week waits our longest backoff, not a week.
    at = next_attempt_at(attempts=1, retry_after=7 * 86400, rng=random.Random(3), **kwargs)
    assert at == NOW + timedelta(seconds=3600)
    # A floor below the jittered wait changes nothing.
    rng_a, rng_b = random.Random(4), random.Random(4)
    plain = next_attempt_at(attempts=12, retry_after=None, rng=rng_a, **kwargs)
    assert next_attempt_at(attempts=12, retry_after=0.0, rng=rng_b, **kwargs) == plain


def test_a_retry_past_the_window_gives_up():
    created = NOW - timedelta(seconds=86400 - 10)
    # The wait would end after created + window: None (dead-lettered now).
    assert (
        next_attempt_at(attempts=1, created_at=created, now=NOW, retry_after=60, base=5, maximum=3600, window=86400)
        is None
    )
    # One that ends inside it is kept.
    assert next_attempt_at(
        attempts=1, created_at=created, now=NOW, retry_after=5, base=1, maximum=3600, window=86400
    ) <= created + timedelta(seconds=86400)
