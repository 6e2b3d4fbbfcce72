"""Per-provider send rate limit (messages per second), shared by every worker through Redis.

Model: GCRA (the "virtual scheduling" form of a token bucket) with *conditional* reservation.
One Redis value per provider, the theoretical arrival time (TAT), holds the whole bucket: the
bucket is full when TAT <= now and empty when TAT >= now + burst / per_second. Taking a token
moves TAT forward by 1 / per_second.

Why this model rather than a plain "take a token if there is one" bucket: when a provider is at
its rate, every waiting worker would sleep until the next refill, wake together and race for
the one token, so all but one lose, poll Redis again and starve at random. Here a worker that can
afford the wait reserves the next free slot atomically and sleeps exactly until it: no race, no
polling, first come first served. And, unlike always-reserving GCRA, a reservation is only made
when the slot begins within the caller's `max_wait_s`; otherwise nothing is taken and the caller
gets the wait to reschedule with, so a message given back to the queue never holds (or loses) a
token. `acquire()` is the same operation with `max_wait_s=0`.

Guarantee: the scheduled send times (call time + returned wait) of any set of granted slots that
fall in an interval of length t number at most `burst + per_second * t`, whatever the
concurrency, because each grant is one atomic script. Workers' clocks are compared with each
other through TAT, so hosts must be NTP-synchronised (a skew of d seconds shifts ~d * per_second
sends).

Known limit: a penalty (provider 429) cannot recall slots already reserved before it; at most
`max_inline_wait_seconds * per_second` such sends still go out, and their 429s extend the penalty.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.commands.core import Script

from providers.redis_state import STATE_ERRORS, StateClient, shared_redis

logger = logging.getLogger(__name__)

# One key per provider, conductor:ratelimit:<provider>:tat, and each script touches only it: one
# slot in a Redis Cluster without a hash tag (kept unrenamed: a rolling deploy that renamed it
# would run two buckets, twice the rate, until the last old worker stopped).
KEY_PREFIX = "conductor:ratelimit"
# TAT in the past means "bucket full", the same as no key, so a key only has to live until its
# TAT; the margin absorbs clock skew between the workers and the Redis server.
KEY_TTL_MARGIN_S = 60
_TTL_MARGIN_MS = KEY_TTL_MARGIN_S * 1000
# An outage of Redis must not flood the logs from every send of every worker.
WARNING_INTERVAL_S = 30.0
# Lua cannot take "inf" reliably; a wait this long means "no limit on the wait".
UNBOUNDED_WAIT_S = 1e9

# KEYS[1] = TAT key. ARGV = now, interval (1 / per_second), burst, max_wait, ttl margin (ms).
# Reserves iff wait <= max_wait. Returns the wait as a string: Lua numbers reaching Redis are
# cut to integers.
_RESERVE_LUA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - burst * interval - now
if wait > max_wait then
  return string.format('%.17g', wait)
end
if wait < 0 then wait = 0 end
local ttl_ms = math.ceil((new_tat - now) * 1000) + tonumber(ARGV[5])
redis.call('SET', KEYS[1], string.format('%.17g', new_tat), 'PX', ttl_ms)
return string.format('%.17g', wait)
"""

# KEYS[1] = TAT key. ARGV = now, interval, burst, retry_after, ttl margin (ms).
# An empty bucket whose next slot is at `until` has TAT = until + (burst - 1) * interval: one
# send at `until` (what Retry-After allows), then one per interval, the burst only after idling.
# Only ever pushes TAT later, so a shorter Retry-After cannot shorten a longer penalty.
_PENALIZE_LUA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local blocked_tat = now + tonumber(ARGV[4]) + (burst - 1) * interval
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if blocked_tat > tat then
  local ttl_ms = math.ceil((blocked_tat - now) * 1000) + tonumber(ARGV[5])
  redis.call('SET', KEYS[1], string.format('%.17g', blocked_tat), 'PX', ttl_ms)
end
return 1
"""


@dataclass(frozen=True)
class RateLimit:
    """One provider's limit. `per_second` None or 0 means unlimited."""

    per_second: float | None = None
    # Tokens a full bucket holds; None = one second's worth (at least 1), so a cold start lets
    # through no more than a second of traffic at once.
    burst: int | None = None
    # The dispatch path sleeps for a slot this close and reschedules the message beyond it.
    max_inline_wait_seconds: float = 1.0

    def __post_init__(self) -> None:
        if self.per_second is not None and not (math.isfinite(self.per_second) and self.per_second >= 0):
            raise ValueError(f"per_second must be None or a finite number >= 0, not {self.per_second!r}")
        if self.burst is not None and self.burst < 1:
            raise ValueError(f"burst must be None or >= 1, not {self.burst!r}")
        if not (math.isfinite(self.max_inline_wait_seconds) and self.max_inline_wait_seconds >= 0):
            raise ValueError(f"max_inline_wait_seconds must be >= 0, not {self.max_inline_wait_seconds!r}")

    @property
    def unlimited(self) -> bool:
        return not self.per_second

    @property
    def effective_burst(self) -> int:
        if self.burst is not None:
            return self.burst
        return max(1, int(self.per_second or 0))


class _ThrottledWarning:
    """Logs a warning at most once per interval (per process: one module-level instance)."""

    def __init__(self, interval_s: float = WARNING_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self._interval_s = interval_s
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()

    def warn(self, message: str, *args: object) -> None:
        with self._lock:
            now = self._clock()
            if self._last is not None and now - self._last < self._interval_s:
                return
            self._last = now
        logger.warning(message, *args)


_redis_down_warning = _ThrottledWarning()


class RateLimiter:
    """The shared token bucket of one provider. Safe to share between threads."""

    def __init__(
        self,
        provider: str,
        limit: RateLimit,
        client: StateClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.provider = provider
        self.limit = limit
        self.key = f"{KEY_PREFIX}:{provider}:tat"
        self._client = client
        self._clock = clock
        self._scripts: tuple[Script, Script] | None = None

    def acquire(self, now: float | None = None) -> float:
        """Take a token if one is free now and return 0.0; else take nothing, return the wait."""
        return self.reserve(now, max_wait_s=0.0)

    def reserve(self, now: float | None = None, *, max_wait_s: float = math.inf) -> float:
        """Reserve the next slot if it starts within `max_wait_s` and return its wait.

        A result <= max_wait_s is a reserved token: sleep that long, then send. A result
        > max_wait_s reserved nothing: it is the wait until a token frees up (reschedule).
        """
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, not {max_wait_s!r}")
        if self.limit.unlimited:
            return 0.0
        now = self._clock() if now is None else now
        bounded = min(max_wait_s, UNBOUNDED_WAIT_S)
        try:
            reserve_script, _ = self._bound_scripts()
            wait = reserve_script(
                keys=[self.key],
                args=[now, self._interval, self.limit.effective_burst, bounded, _TTL_MARGIN_MS],
            )
        except STATE_ERRORS as exc:
            self._warn_fail_open(exc)
            return 0.0
        # Exact: both doubles cross the Lua boundary as repr / %.17g, so the caller's
        # `wait > max_wait_s` agrees with the script's decision to reserve or not.
        return float(wait)

    def penalize(self, retry_after_s: float, now: float | None = None) -> None:
        """A provider's 429: no slot for anyone before now + retry_after_s, then refill from empty."""
        if self.limit.unlimited:
            return
        now = self._clock() if now is None else now
        try:
            _, penalize_script = self._bound_scripts()
            penalize_script(
                keys=[self.key],
                args=[now, self._interval, self.limit.effective_burst, max(retry_after_s, 0.0), _TTL_MARGIN_MS],
            )
        except STATE_ERRORS as exc:
            self._warn_fail_open(exc)

    @property
    def _interval(self) -> float:
        return 1.0 / (self.limit.per_second or math.inf)  # callers returned early when unlimited

    def _bound_scripts(self) -> tuple[Script, Script]:
        # Lazy: an unlimited provider never needs a client (nor settings.REDIS_URL).
        if self._scripts is None:
            if self._client is None:
                self._client = shared_redis()
            self._scripts = (self._client.register_script(_RESERVE_LUA), self._client.register_script(_PENALIZE_LUA))
        return self._scripts

    def _warn_fail_open(self, exc: Exception) -> None:
        _redis_down_warning.warn(
            "Rate limit of provider %s not enforced: Redis unavailable (%s: %s); sending without waiting.",
            self.provider,
            type(exc).__name__,
            exc,
        )


def wait_for_slot(
    limiter: RateLimiter,
    *,
    max_inline_wait_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Sleep for a slot within `max_inline_wait_s` (default: the limit's) and return 0.0, or
    return the longer wait for the caller to reschedule with. A rescheduled message has consumed
    no token; a 0.0 return means the token is spent, so the caller must send."""
    if max_inline_wait_s is None:
        max_inline_wait_s = limiter.limit.max_inline_wait_seconds
    wait = limiter.reserve(max_wait_s=max_inline_wait_s)
    if wait > max_inline_wait_s:
        return wait
    if wait > 0:
        sleep(wait)
    return 0.0
