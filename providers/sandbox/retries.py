"""Each provider's documented retry behaviour for a callback that fails, as data with its source.

The delays are the providers' real ones; the sandbox multiplies them by the provider's
`callback_retry_scale` fault setting so that a test does not wait hours. Per-attempt timeouts
are not scaled. docs/sandbox.md has the full citations and what the sandbox makes of each.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import parse_qsl

# Kinds of failed attempt, named as Twilio's retry policy (`rp`) names them.
CONNECT = "ct"  # no connection: refused, reset before an answer, or the connect timeout passed
READ = "rt"  # connected, but no answer within the read timeout
CLIENT_ERROR = "4xx"  # any other non-2xx answer below 500 (3xx included: redirects are not followed)
SERVER_ERROR = "5xx"
TOO_MANY_REQUESTS = "429"  # Vonage retries it although it is a 4xx
ALL_KINDS = frozenset({CONNECT, READ, CLIENT_ERROR, SERVER_ERROR})


@dataclass(frozen=True)
class RetryPolicy:
    """When and how often one provider tries a callback again."""

    name: str
    # Pause before each retry in real seconds, in order; their number is the retry budget.
    delays_s: tuple[float, ...]
    retry_on: frozenset[str]
    # Answers that end the callback at once (Mailgun's 406 Not Acceptable).
    stop_on: frozenset[int] = frozenset()
    # Callback statuses the provider never retries (Mailgun's delivery notification).
    single_attempt_statuses: frozenset[str] = frozenset()
    connect_timeout_s: float | None = None
    read_timeout_s: float | None = None
    attempt_timeout_s: float | None = None  # whole attempt, when the provider gives no finer split
    # All attempts together (Twilio's `tt`); None: no limit beyond the delays.
    total_s: float | None = None
    # False for the legacy final_only schedule, which was already sandbox-sized.
    scaled: bool = True

    def retry_delay(self, *, attempt: int, kind: str, code: int | None, status: str, elapsed_s: float) -> float | None:
        """Real seconds to wait before the next attempt after `attempt` failed, or None: give up."""
        if attempt > len(self.delays_s) or status in self.single_attempt_statuses:
            return None
        if code is not None and code in self.stop_on:
            return None
        if kind not in self.retry_on and not (code == 429 and TOO_MANY_REQUESTS in self.retry_on):
            return None
        if self.total_s is not None and elapsed_s >= self.total_s:
            return None
        return self.delays_s[attempt - 1]

    def remaining_s(self, elapsed_s: float) -> float | None:
        return None if self.total_s is None else max(0.001, self.total_s - elapsed_s)


def backoff(*, first_s: float, factor: float, cap_s: float, horizon_s: float) -> tuple[float, ...]:
    """Delays of an exponential backoff capped at `cap_s`, until `horizon_s` after the first try."""
    delays: list[float] = []
    delay, spent = first_s, 0.0
    while spent + delay <= horizon_s:
        delays.append(delay)
        spent += delay
        delay = min(delay * factor, cap_s)
    return tuple(delays)


# --- Twilio ------------------------------------------------------------------------------------
# https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides : overrides ride in the
# URL's fragment; defaults: connect timeout ct=5000 ms (100-10000), read timeout rt=15000 ms
# (100-15000), total time tt=15000 ms for every attempt together (100-15000), retry count rc=1
# (0-5), retry policy rp (4xx, 5xx, ct, rt, all) whose default is ct: only a failed connection is
# retried, a 5xx answer is not. No pause between attempts is documented: the sandbox retries at once.
TWILIO_DEFAULT_RC = 1
TWILIO_MAX_RC = 5
TWILIO_DEFAULT_RP = frozenset({CONNECT})
TWILIO_CT_MS = (100, 5000, 10000)  # (min, default, max)
TWILIO_RT_MS = (100, 15000, 15000)
TWILIO_TT_MS = (100, 15000, 15000)


def _clamped(raw: str | None, limits: tuple[int, int, int]) -> int:
    low, default, high = limits
    try:
        return min(max(int(raw), low), high) if raw is not None else default
    except ValueError:
        return default


@functools.lru_cache(maxsize=64)  # one per distinct URL fragment: nearly always the empty one
def twilio_policy(fragment: str = "") -> RetryPolicy:
    """Twilio's policy for a callback URL, honouring its connection overrides (`#rc=3&rp=all`)."""
    overrides = dict(parse_qsl(fragment))
    rc = _clamped(overrides.get("rc"), (0, TWILIO_DEFAULT_RC, TWILIO_MAX_RC))
    if "rp" in overrides:
        kinds = {part.strip() for part in overrides["rp"].split(",")}
        retry_on = ALL_KINDS if "all" in kinds else frozenset(kinds & ALL_KINDS)
    else:
        retry_on = TWILIO_DEFAULT_RP
    return RetryPolicy(
        name="twilio",
        delays_s=(0.0,) * rc,
        retry_on=retry_on,
        connect_timeout_s=_clamped(overrides.get("ct"), TWILIO_CT_MS) / 1000,
        read_timeout_s=_clamped(overrides.get("rt"), TWILIO_RT_MS) / 1000,
        total_s=_clamped(overrides.get("tt"), TWILIO_TT_MS) / 1000,
    )


TWILIO = twilio_policy("")

# --- Vonage ------------------------------------------------------------------------------------
# https://api.support.vonage.com/hc/en-us/articles/360028543292 (applies to the SMS API's
# callbacks): an answer of 429 or 5xx is attempted again, each callback on its own; exponential
# backoff from 5 s, doubling until 15 minutes, then every 15 minutes; discarded after 24 hours.
# Other answers are not retried; an unreachable webhook (no answer) is retried like a 5xx here.
# No timeout is documented for SMS callbacks: the sandbox gives an attempt 5 s.
VONAGE_RETRY_DELAYS_S = backoff(first_s=5, factor=2, cap_s=15 * 60, horizon_s=24 * 3600)
VONAGE = RetryPolicy(
    name="vonage",
    delays_s=VONAGE_RETRY_DELAYS_S,
    retry_on=frozenset({CONNECT, READ, SERVER_ERROR, TOO_MANY_REQUESTS}),
    attempt_timeout_s=5.0,
)

# --- Mailgun -----------------------------------------------------------------------------------
# https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/webhook-retries : 200 is
# success; 406 Not Acceptable rejects the POST and is not retried; any other code is retried
# "for Webhooks other than the delivery notification" during 8 hours, at 5 min, 10 min, 15 min,
# 1 h, 2 h, 4 h. (Its older help-centre page listed 10 min, 10 min, 15 min, 30 min, 1 h, 2 h,
# 4 h.) No timeout is documented: the sandbox gives an attempt 5 s.
MAILGUN_RETRY_DELAYS_S = (5 * 60.0, 10 * 60.0, 15 * 60.0, 3600.0, 2 * 3600.0, 4 * 3600.0)
MAILGUN = RetryPolicy(
    name="mailgun",
    delays_s=MAILGUN_RETRY_DELAYS_S,
    retry_on=ALL_KINDS,
    stop_on=frozenset({406}),
    single_attempt_statuses=frozenset({"delivered"}),
    attempt_timeout_s=5.0,
)

# --- final_only: the sandbox's behaviour before realistic callbacks -------------------------------
# A receiver that is briefly down (a restarting web process) still gets its receipt, while a
# dead one is given up on within two seconds. Already sandbox-sized, so never scaled.
FINAL_ONLY = RetryPolicy(
    name="final_only",
    delays_s=(0.2, 0.5, 1.0),
    retry_on=ALL_KINDS,
    attempt_timeout_s=5.0,
    scaled=False,
)

POLICIES = {"twilio": TWILIO, "vonage": VONAGE, "mailgun": MAILGUN}
