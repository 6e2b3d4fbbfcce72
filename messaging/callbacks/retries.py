"""What a callback attempt's answer means, and when to try again: pure functions, no I/O.

2xx: delivered. Timeouts, connection errors, 5xx, 408, 409 and 429: tried again after a
full-jitter exponential backoff (a `Retry-After` on 429 and 503 is a floor), until the callback
is older than CALLBACK_RETRY_WINDOW_SECONDS. Any other answer (the rest of 4xx, 3xx: we follow
no redirect) is final: the receiver told us it will never take this request; so is a host that
resolves to an address callbacks may not go to (messaging.callbacks.destinations).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

RETRIED_STATUSES = frozenset({408, 409, 429})
RETRY_AFTER_STATUSES = frozenset({429, 503})

# Outcomes (conductor_callbacks_sent_total{outcome}).
DELIVERED = "delivered"
RETRY = "retry"
FINAL = "final"

# Why an attempt failed (conductor_callbacks_failed_total{reason}).
TIMEOUT = "timeout"
CONNECTION = "connection"
HTTP_5XX = "http_5xx"
HTTP_4XX = "http_4xx"
HTTP_429 = "http_429"
HTTP_3XX = "http_3xx"
CIRCUIT_OPEN = "circuit_open"
BLOCKED = "blocked_address"  # the host resolved to an address callbacks may not go to (destinations.py)


@dataclass(frozen=True)
class Verdict:
    outcome: str  # DELIVERED, RETRY or FINAL
    reason: str = ""  # the failure reason, "" when delivered
    # Counts against the endpoint's circuit: it is down or overloaded, not refusing this request.
    endpoint_failing: bool = False


def classify(*, status: int | None, error: str = "") -> Verdict:
    """The verdict on one attempt: an HTTP status, or no status and the transport error
    (TIMEOUT, CONNECTION or BLOCKED)."""
    if status is None and error == BLOCKED:
        return Verdict(FINAL, BLOCKED)  # the URL's fault, not the endpoint's health: never retried
    if status is None:
        return Verdict(RETRY, TIMEOUT if error == TIMEOUT else CONNECTION, endpoint_failing=True)
    if 200 <= status < 300:
        return Verdict(DELIVERED)
    if status >= 500:
        return Verdict(RETRY, HTTP_5XX, endpoint_failing=True)
    if status == 429:
        return Verdict(RETRY, HTTP_429, endpoint_failing=True)
    if status in RETRIED_STATUSES:
        return Verdict(RETRY, HTTP_4XX, endpoint_failing=True)
    return Verdict(FINAL, HTTP_3XX if status < 400 else HTTP_4XX)


def retry_after_seconds(value: str | None, *, now: datetime) -> float | None:
    """A Retry-After header in seconds from `now`: delay-seconds or an HTTP-date (RFC 9110);
    None when absent or unreadable, 0 for a date in the past."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def backoff_seconds(*, attempts: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Full jitter: uniform(0, min(maximum, base * 2**(attempts - 1))) after the attempts-th failure."""
    exponent = min(max(attempts - 1, 0), 62)  # 2**62 * base is past any maximum already
    return (rng or random).uniform(0, min(maximum, base * 2**exponent))


def next_attempt_at(
    *,
    attempts: int,
    created_at: datetime,
    now: datetime,
    retry_after: float | None,
    base: float,
    maximum: float,
    window: float,
    rng: random.Random | None = None,
) -> datetime | None:
    """When to try a callback again after its `attempts`-th failure, or None: that time falls
    past its retry window (created_at + window), so it is given up on now.

    A receiver's Retry-After is a floor on the wait, itself capped at `maximum`: a receiver cannot
    park a callback for longer than our longest backoff.
    """
    wait = backoff_seconds(attempts=attempts, base=base, maximum=maximum, rng=rng)
    if retry_after is not None:
        wait = max(wait, min(retry_after, maximum))
    at = now + timedelta(seconds=wait)
    if at > created_at + timedelta(seconds=window):
        return None
    return at
