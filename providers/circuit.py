"""Per-provider circuit breaker (resilience4j semantics), its state shared by every worker in Redis."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.commands.core import Script

from providers.redis_state import STATE_ERRORS, StateClient, hash_tagged_key, shared_redis

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# Lowest priority first: half-open trials are offered to bulk traffic before critical traffic,
# because a failed trial costs a bulk message a retry but could cost a critical one its deadline.
PRIORITY_RANK = {"bulk": 0, "transactional": 1, "critical": 2}

# Twenty calls is enough to tell an outage from a few unlucky sends, and short enough to react
# within seconds at campaign rates.
WINDOW_SIZE = 20
# Below ten outcomes a rate is noise: two failures out of three calls must not open the circuit.
MINIMUM_CALLS = 10
# Half the calls failing is an outage, not bad numbers (those are recorded as successes).
FAILURE_RATE_THRESHOLD = 0.5
# A send slower than this holds a worker for longer than a provider that works ever needs.
SLOW_CALL_SECONDS = 10.0
# Long enough for a provider's incident to clear or its rate limiter to reset, short enough that
# critical traffic comes back to the preferred provider within a minute.
OPEN_SECONDS = 30.0
# A few real messages are enough to learn whether the provider is back, and few to put at risk.
HALF_OPEN_MAX_TRIALS = 3
# Three successes in a row are unlikely from a provider that is still failing half of the time.
HALF_OPEN_SUCCESSES_TO_CLOSE = 3
# Longer than any send's timeout: a trial permit not recorded by then belongs to a dead worker.
TRIAL_TIMEOUT_SECONDS = 60.0
# Lower-priority traffic that asked this recently is still around to take the risk of a trial.
HALF_OPEN_PRIORITY_WINDOW_SECONDS = 5.0
# An hour without a call: the window's outcomes say nothing about the provider now, so let the
# keys of idle providers expire (an idle open circuit comes back closed).
IDLE_TTL_SECONDS = 3600
# Redis being down must not flood the log from every send: one warning per process per period.
FAIL_OPEN_WARNING_INTERVAL_SECONDS = 30.0

# Keys: conductor:{circuit:<name>}:<part>, parts as below. The braces are the hash tag: a
# breaker's scripts touch several of its keys at once, and a Redis Cluster runs a script only
# when all its keys are in one slot. (Before issue 25 they were conductor:circuit:<name>:<part>;
# such keys are no longer read and expire within IDLE_TTL_SECONDS.)
KEY_KIND = "circuit"
KEY_PARTS = ("state", "window", "trials", "asked", "forced")


@dataclass(frozen=True)
class CircuitSettings:
    window_size: int = WINDOW_SIZE
    minimum_calls: int = MINIMUM_CALLS
    failure_rate_threshold: float = FAILURE_RATE_THRESHOLD
    slow_call_seconds: float = SLOW_CALL_SECONDS
    open_seconds: float = OPEN_SECONDS
    half_open_max_trials: int = HALF_OPEN_MAX_TRIALS
    half_open_successes_to_close: int = HALF_OPEN_SUCCESSES_TO_CLOSE
    trial_timeout_seconds: float = TRIAL_TIMEOUT_SECONDS
    half_open_priority_window_seconds: float = HALF_OPEN_PRIORITY_WINDOW_SECONDS
    idle_ttl_seconds: int = IDLE_TTL_SECONDS

    def __post_init__(self) -> None:
        # Settings that cannot work fail loudly at start-up rather than never opening the circuit.
        if not 1 <= self.minimum_calls <= self.window_size:
            raise ValueError("CircuitSettings needs 1 <= minimum_calls <= window_size")
        if not 0 < self.failure_rate_threshold <= 1:
            raise ValueError("CircuitSettings needs 0 < failure_rate_threshold <= 1")
        if self.half_open_max_trials < 1 or self.half_open_successes_to_close < 1:
            raise ValueError("CircuitSettings needs at least one half-open trial and one success to close")
        if self.idle_ttl_seconds <= max(self.open_seconds, self.trial_timeout_seconds):
            raise ValueError("CircuitSettings needs idle_ttl_seconds longer than open_seconds and trial timeouts")


@dataclass(frozen=True)
class Permit:
    """Leave to make one call; hand it back to `record()` with the call's outcome."""

    provider: str
    trial: bool
    issued_at: float
    # The state generation it was issued in: outcomes of calls let through under an earlier
    # state (e.g. before the circuit opened) say nothing about the current one and are ignored.
    epoch: int = 0
    trial_id: str = ""
    # Issued without asking Redis (unreachable): there is no shared state to record it in.
    fail_open: bool = False


# State hash fields: state, epoch (bumped on every transition), opened_at, successes (half-open),
# times_opened (for metrics). The window is a list of "1" (failure) / "0" (success), newest first.
# Trials is a sorted set of trial ids scored by issue time. Asked is a hash priority rank -> the
# last time a caller of that priority asked while the circuit was not closed.

# KEYS: state, window, trials, asked, forced
# ARGV: now, priority rank, open_seconds, max_trials, trial_timeout, priority_window, ttl, trial_id
# Returns {granted 0/1, trial 0/1, epoch, state}.
ALLOW_LUA = """
local now = tonumber(ARGV[1])
local rank = tonumber(ARGV[2])
local ttl = tonumber(ARGV[7])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')

-- Forced open by an operator (a drill): refused whatever the stored state, which is left alone,
-- so the circuit carries on from where it was once the forced key is cleared or expires.
if redis.call('EXISTS', KEYS[5]) == 1 then
  return {0, 0, epoch, 'open'}
end

-- Closed is the hot path: no write at all.
if state == 'closed' then
  return {1, 0, epoch, state}
end

-- Remember who is around, open or half-open, so the lowest priority is first to a trial.
local last = tonumber(redis.call('HGET', KEYS[4], rank) or '-1e300')
if now > last then
  redis.call('HSET', KEYS[4], rank, ARGV[1])
end
redis.call('EXPIRE', KEYS[4], ttl)

if state == 'open' then
  local opened_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at') or '0')
  if now < opened_at + tonumber(ARGV[3]) then
    return {0, 0, epoch, state}
  end
  -- The wait is over: the first caller moves it to half-open, with no trials and no successes.
  state = 'half_open'
  epoch = epoch + 1
  redis.call('HSET', KEYS[1], 'state', state, 'epoch', epoch, 'successes', 0)
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ttl)
end

-- Half-open. A trial whose worker died is forgotten after the trial timeout.
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. (now - tonumber(ARGV[5])))
-- Lower-priority traffic seen within the priority window takes the risk instead of this caller.
for lower = 0, rank - 1 do
  local asked = tonumber(redis.call('HGET', KEYS[4], lower) or '-1e300')
  if now - asked < tonumber(ARGV[6]) then
    return {0, 0, epoch, state}
  end
end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then
  return {0, 0, epoch, state}
end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[8])
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('EXPIRE', KEYS[1], ttl)
return {1, 1, epoch, state}
"""

# KEYS: state, window, trials
# ARGV: now, window_size, minimum_calls, failure_rate_threshold, successes_to_close, ttl, then
#       per call, in the order they are to count: failed 0/1, permit epoch, trial 0/1, trial_id
# Returns {stored state after the last call, opened_at or false}. A batch is one script run, not
# a pipeline of runs: one slot, one round trip, and a cluster pipeline cannot run scripts.
RECORD_LUA = """
local now = ARGV[1]
local ttl = tonumber(ARGV[6])

local function open(epoch)
  redis.call('HSET', KEYS[1], 'state', 'open', 'epoch', epoch + 1, 'opened_at', now, 'successes', 0)
  redis.call('HINCRBY', KEYS[1], 'times_opened', 1)
  redis.call('DEL', KEYS[3])
  redis.call('EXPIRE', KEYS[1], ttl)
  return 'open'
end

-- One call's outcome; returns the stored state after it.
local function record(failed, permit_epoch, trial, trial_id)
  local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')

  if trial then
    -- Only a trial still in flight counts: one from an earlier half-open, or one forgotten after
    -- the trial timeout, is late news.
    if state ~= 'half_open' or redis.call('ZREM', KEYS[3], trial_id) == 0 then
      return state
    end
    if failed then
      return open(epoch)
    end
    local successes = redis.call('HINCRBY', KEYS[1], 'successes', 1)
    if successes >= tonumber(ARGV[5]) then
      redis.call('HSET', KEYS[1], 'state', 'closed', 'epoch', epoch + 1, 'successes', 0)
      redis.call('DEL', KEYS[2], KEYS[3])
      redis.call('EXPIRE', KEYS[1], ttl)
      return 'closed'
    end
    return state
  end

  -- An ordinary call counts only in the closed state it was let through in.
  if state ~= 'closed' or permit_epoch ~= epoch then
    return state
  end
  redis.call('LPUSH', KEYS[2], failed and '1' or '0')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  redis.call('EXPIRE', KEYS[2], ttl)
  -- Keep the epoch (and times_opened) alive as long as the window is.
  redis.call('EXPIRE', KEYS[1], ttl)
  local outcomes = redis.call('LRANGE', KEYS[2], 0, -1)
  local failures = 0
  for _, outcome in ipairs(outcomes) do
    if outcome == '1' then failures = failures + 1 end
  end
  if #outcomes >= tonumber(ARGV[3]) and failures / #outcomes >= tonumber(ARGV[4]) then
    return open(epoch)
  end
  return state
end

local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
for i = 7, #ARGV, 4 do
  state = record(ARGV[i] == '1', tonumber(ARGV[i + 1]), ARGV[i + 2] == '1', ARGV[i + 3])
end
return {state, redis.call('HGET', KEYS[1], 'opened_at')}
"""


class _FailOpenWarning:
    """Says, at most once per interval in this process, that breakers are failing open."""

    def __init__(self, interval_s: float = FAIL_OPEN_WARNING_INTERVAL_SECONDS):
        self.interval_s = interval_s
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, provider: str, error: Exception) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.interval_s:
                return
            self._last = now
        logger.warning(
            "Circuit breaker failing open: Redis unreachable (%s: %s); provider %s and all others "
            "are let through unguarded until it answers",
            type(error).__name__,
            error,
            provider,
        )


_warn_fail_open = _FailOpenWarning()


class CircuitBreaker:
    """One provider's circuit. Cheap to build; every decision is one atomic script in Redis."""

    def __init__(
        self,
        provider: str,
        settings: CircuitSettings,
        client: StateClient | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.provider = provider
        self.settings = settings
        self._client = client
        self.clock = clock
        self.keys = {part: hash_tagged_key(KEY_KIND, provider, part) for part in KEY_PARTS}
        self._scripts: tuple[Script, Script] | None = None

    @property
    def client(self) -> StateClient:
        """The state client, the shared one unless given. Built on first use, inside the callers'
        fail-open handling: a cluster client connects when it is built, and a breaker made while
        Redis is down must fail open, not raise."""
        if self._client is None:
            self._client = shared_redis()
        return self._client

    def _bound_scripts(self) -> tuple[Script, Script]:
        # register_script does not talk to Redis; the script is loaded on first use (and again
        # after a Redis restart empties its script cache).
        if self._scripts is None:
            self._scripts = (self.client.register_script(ALLOW_LUA), self.client.register_script(RECORD_LUA))
        return self._scripts

    def allow(self, *, priority: str) -> Permit | None:
        """A permit to call the provider now, or None: the circuit is open (fail fast, go elsewhere)."""
        if priority not in PRIORITY_RANK:
            raise ValueError(f"unknown priority {priority!r}; expected one of {sorted(PRIORITY_RANK)}")
        now = self.clock()
        trial_id = uuid.uuid4().hex
        s = self.settings
        keys = [self.keys["state"], self.keys["window"], self.keys["trials"], self.keys["asked"], self.keys["forced"]]
        args = [
            repr(now),
            PRIORITY_RANK[priority],
            s.open_seconds,
            s.half_open_max_trials,
            s.trial_timeout_seconds,
            s.half_open_priority_window_seconds,
            s.idle_ttl_seconds,
            trial_id,
        ]
        try:
            allow_script, _ = self._bound_scripts()
            granted, trial, epoch, _stored_state = allow_script(keys=keys, args=args)
        except STATE_ERRORS as error:
            # A breaker that cannot reach its state must not become the outage itself.
            _warn_fail_open(self.provider, error)
            return Permit(self.provider, trial=False, issued_at=now, fail_open=True)
        if not granted:
            return None
        return Permit(
            self.provider, trial=bool(trial), issued_at=now, epoch=int(epoch), trial_id=trial_id if trial else ""
        )

    def record(self, permit: Permit, *, failed: bool, duration_s: float) -> str:
        """Record a call's outcome (failed: transient or ambiguous error); returns the state after it."""
        # A call this slow is a failing provider even if it answered.
        failed = failed or duration_s > self.settings.slow_call_seconds
        if permit.fail_open:
            # Nothing shared knows of this call; asking Redis again would only add a timeout.
            return CLOSED
        try:
            stored, opened_at = self._run_record([(permit, failed)])
        except STATE_ERRORS as error:
            _warn_fail_open(self.provider, error)
            return CLOSED
        return self._effective_state(stored.decode(), float(opened_at) if opened_at else None, self.clock())

    def record_many(self, outcomes: list[tuple[Permit, bool, float]]) -> None:
        """record() for many calls (permit, failed, duration_s) in one round trip to Redis: one
        run of the same script, recording them in order (the bulk send path records a whole batch)."""
        shared = [outcome for outcome in outcomes if not outcome[0].fail_open]
        # Calls let through by one closed-state permit ran at the same moment, in no order: only
        # the newest window's worth of them can be in the window afterwards, so only those are
        # sent (a batch of 100 sends costs 20 script runs, not 100). Trials all count.
        ordinary = [outcome for outcome in shared if not outcome[0].trial]
        shared = [outcome for outcome in shared if outcome[0].trial] + ordinary[-self.settings.window_size :]
        if not shared:
            return
        slow = self.settings.slow_call_seconds
        try:
            self._run_record([(permit, failed or duration_s > slow) for permit, failed, duration_s in shared])
        except STATE_ERRORS as error:
            _warn_fail_open(self.provider, error)

    def _run_record(self, calls: list[tuple[Permit, bool]]) -> list[Any]:
        """RECORD_LUA over (permit, failed) calls, in order; returns its {state, opened_at}."""
        s = self.settings
        args: list[Any] = [
            repr(self.clock()),
            s.window_size,
            s.minimum_calls,
            s.failure_rate_threshold,
            s.half_open_successes_to_close,
            s.idle_ttl_seconds,
        ]
        for permit, failed in calls:
            args += [int(failed), permit.epoch, int(permit.trial), permit.trial_id]
        _, record_script = self._bound_scripts()
        return record_script(keys=[self.keys["state"], self.keys["window"], self.keys["trials"]], args=args)

    def state(self, now: float | None = None) -> str:
        """closed, open or half_open (an open circuit whose wait is over reports half_open)."""
        return self.snapshot(now)["state"]

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """The state and its counts, for metrics and the dashboard (read-only)."""
        now = self.clock() if now is None else now
        s = self.settings
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.keys["state"])
                pipe.lrange(self.keys["window"], 0, -1)
                pipe.zcount(self.keys["trials"], now - s.trial_timeout_seconds, "+inf")
                pipe.pttl(self.keys["forced"])
                pipe.get(self.keys["forced"])
                fields, window, trials, forced_ms, forced_reason = pipe.execute()
        except STATE_ERRORS as error:
            _warn_fail_open(self.provider, error)
            return {"provider": self.provider, "state": CLOSED, "failing_open": True}
        fields = {k.decode(): v.decode() for k, v in fields.items()}
        stored = fields.get("state", CLOSED)
        opened_at = float(fields["opened_at"]) if "opened_at" in fields else None
        failures = window.count(b"1")
        # PTTL: -2 no key, -1 no expiry (never written so, but an open without end is still open).
        forced = forced_ms != -2
        return {
            "provider": self.provider,
            "state": OPEN if forced else self._effective_state(stored, opened_at, now),
            "forced": forced,
            "forced_until": now + forced_ms / 1000 if forced and forced_ms >= 0 else None,
            "forced_reason": forced_reason.decode() if forced and forced_reason else "",
            "failing_open": False,
            "window_calls": len(window),
            "window_failures": failures,
            "failure_rate": failures / len(window) if window else 0.0,
            "trials_in_flight": trials,
            "half_open_successes": int(fields.get("successes", 0)),
            "opened_at": opened_at,
            "times_opened": int(fields.get("times_opened", 0)),
            "epoch": int(fields.get("epoch", 0)),
        }

    def force_open(self, *, seconds: float, reason: str) -> None:
        """Refuse every call for `seconds` whatever the window says (an operator's drill). The
        forced state is its own key with an expiry: a drill that dies cannot leave it open."""
        if seconds <= 0:
            raise ValueError("force_open needs a positive number of seconds")
        self.client.set(self.keys["forced"], reason or "forced", px=max(1, round(seconds * 1000)))
        logger.warning("Circuit %s forced open for %.0fs: %s", self.provider, seconds, reason)

    def clear_forced(self) -> bool:
        """End a forced open (the circuit goes on from its stored state); True if one was set."""
        cleared = bool(self.client.delete(self.keys["forced"]))
        if cleared:
            logger.warning("Circuit %s no longer forced open", self.provider)
        return cleared

    def reset(self) -> None:
        """Forget everything: closed with an empty window (tests, and operators after a fix)."""
        self.client.delete(*self.keys.values())

    def _effective_state(self, stored: str, opened_at: float | None, now: float) -> str:
        if stored == OPEN and opened_at is not None and now >= opened_at + self.settings.open_seconds:
            return HALF_OPEN
        return stored
