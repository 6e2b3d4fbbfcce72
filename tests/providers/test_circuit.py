"""The circuit breaker against a real Redis, with an injected clock (no sleeps)."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import replace

import pytest
import redis

from providers import circuit
from providers.circuit import CircuitBreaker, CircuitSettings, Permit

REDIS_URL = "redis://127.0.0.1:6379/13"  # 14 and 15 belong to the rest of the test suite
T0 = 1_700_000_000.0
SETTINGS = CircuitSettings()


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def breaker(client, clock) -> CircuitBreaker:
    return CircuitBreaker("twilio", SETTINGS, client=client, clock=clock)


def another_worker(clock: Clock, settings: CircuitSettings = SETTINGS) -> CircuitBreaker:
    """A second breaker on its own connection: what another worker process or host would hold."""
    return CircuitBreaker("twilio", settings, client=redis.Redis.from_url(REDIS_URL), clock=clock)


def call(breaker: CircuitBreaker, *, failed: bool, duration_s: float = 0.1, priority: str = "bulk") -> str:
    permit = breaker.allow(priority=priority)
    assert permit is not None
    return breaker.record(permit, failed=failed, duration_s=duration_s)


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(SETTINGS.minimum_calls):
        call(breaker, failed=True)
    assert breaker.state() == "open"


def half_open(breaker: CircuitBreaker, clock: Clock) -> None:
    trip(breaker)
    clock.now += SETTINGS.open_seconds
    assert breaker.state() == "half_open"


# --- closed: the sliding window ---------------------------------------------------------------


def test_opens_at_the_threshold_only_with_minimum_calls(breaker):
    for _ in range(SETTINGS.minimum_calls - 1):
        assert call(breaker, failed=True) == "closed"  # 100% failures, but too few calls to judge
    assert call(breaker, failed=True) == "open"
    assert breaker.snapshot()["times_opened"] == 1


def test_opens_at_exactly_the_failure_rate(breaker):
    for _ in range(5):
        call(breaker, failed=False)
    for _ in range(4):
        assert call(breaker, failed=True) == "closed"
    assert call(breaker, failed=True) == "open"  # 5 of 10 is 50%: >= the threshold opens


def test_below_the_threshold_stays_closed(breaker):
    for _ in range(11):
        call(breaker, failed=False)
    for _ in range(9):
        assert call(breaker, failed=True) == "closed"  # 9 of 20: below 50%
    snap = breaker.snapshot()
    assert (snap["window_calls"], snap["window_failures"]) == (20, 9)
    # The window is full: this failure pushes the oldest success out, making 10 of 20.
    assert call(breaker, failed=True) == "open"


def test_old_failures_slide_out_of_the_window(breaker):
    for failed in [False] * 11 + [True] * 9 + [False] * 11:
        assert call(breaker, failed=failed) == "closed"
    assert breaker.snapshot()["window_failures"] == 9  # the 11 oldest (successes) slid out
    assert call(breaker, failed=False) == "closed"
    snap = breaker.snapshot()
    assert (snap["window_calls"], snap["window_failures"]) == (SETTINGS.window_size, 8)


def test_slow_successes_count_as_failures(breaker):
    slow = SETTINGS.slow_call_seconds + 0.5
    for _ in range(SETTINGS.minimum_calls - 1):
        assert call(breaker, failed=False, duration_s=slow) == "closed"
    assert breaker.snapshot()["window_failures"] == SETTINGS.minimum_calls - 1
    assert call(breaker, failed=False, duration_s=slow) == "open"


def test_permanent_errors_recorded_as_successes_never_open_it(breaker):
    # The caller records a bad number (PermanentProviderError) as failed=False: the provider works.
    for _ in range(SETTINGS.window_size * 2):
        assert call(breaker, failed=False) == "closed"
    assert breaker.snapshot()["window_failures"] == 0


def test_outcomes_of_calls_let_through_before_a_transition_are_ignored(breaker, clock):
    stale = breaker.allow(priority="bulk")
    half_open(breaker, clock)
    for _ in range(SETTINGS.half_open_successes_to_close):
        call(breaker, failed=False)
    assert breaker.state() == "closed"
    # A call allowed before the circuit opened says nothing about the provider now.
    assert breaker.record(stale, failed=True, duration_s=1.0) == "closed"
    assert breaker.snapshot()["window_calls"] == 0


# --- open -------------------------------------------------------------------------------------


def test_open_refuses_every_priority_until_open_seconds(breaker, clock):
    trip(breaker)
    clock.now += SETTINGS.open_seconds - 0.1
    for priority in ("bulk", "transactional", "critical"):
        assert breaker.allow(priority=priority) is None
    assert breaker.state() == "open"
    clock.now += 0.1
    assert breaker.state() == "half_open"
    assert breaker.state(now=clock.now - 1) == "open"
    permit = breaker.allow(priority="bulk")
    assert permit is not None and permit.trial


# --- half-open --------------------------------------------------------------------------------


def test_half_open_caps_trials_across_workers(breaker, clock):
    half_open(breaker, clock)
    other = another_worker(clock)
    trials = [breaker.allow(priority="bulk"), other.allow(priority="bulk"), breaker.allow(priority="bulk")]
    assert all(t is not None and t.trial for t in trials)
    assert other.allow(priority="bulk") is None
    assert breaker.allow(priority="bulk") is None
    assert other.snapshot()["trials_in_flight"] == SETTINGS.half_open_max_trials
    # A recorded trial frees its place, whichever worker records it.
    assert other.record(trials[0], failed=False, duration_s=0.2) == "half_open"
    assert other.allow(priority="bulk").trial


def test_concurrent_callers_get_exactly_the_trial_cap(breaker, clock):
    half_open(breaker, clock)
    workers = [another_worker(clock) for _ in range(8)]
    start = threading.Barrier(len(workers))
    permits: list[Permit | None] = []

    def ask(worker: CircuitBreaker) -> None:
        start.wait()
        permits.extend(worker.allow(priority="bulk") for _ in range(5))

    threads = [threading.Thread(target=ask, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    granted = [p for p in permits if p is not None]
    assert len(permits) == 40
    assert len(granted) == SETTINGS.half_open_max_trials
    assert all(p.trial for p in granted)


def test_a_forgotten_trial_expires_and_its_late_outcome_is_ignored(breaker, clock):
    half_open(breaker, clock)
    held = [breaker.allow(priority="bulk") for _ in range(SETTINGS.half_open_max_trials)]
    clock.now += SETTINGS.trial_timeout_seconds - 1
    assert breaker.allow(priority="bulk") is None  # the workers may still be sending
    clock.now += 1.01
    fresh = breaker.allow(priority="bulk")  # they died: their permits no longer hold the circuit
    assert fresh is not None and fresh.trial
    assert breaker.record(held[0], failed=False, duration_s=0.1) == "half_open"
    assert breaker.snapshot()["half_open_successes"] == 0


def test_lowest_priority_goes_first(breaker, clock):
    half_open(breaker, clock)
    first = breaker.allow(priority="bulk")
    assert first is not None and first.trial
    clock.now += 1
    # Bulk traffic is around: it takes the risk; critical and transactional go to another provider.
    assert breaker.allow(priority="critical") is None
    assert breaker.allow(priority="transactional") is None
    assert breaker.allow(priority="bulk").trial
    breaker.record(first, failed=False, duration_s=0.1)
    # No bulk caller for the whole priority window: transactional is the lowest priority around.
    clock.now += SETTINGS.half_open_priority_window_seconds
    assert breaker.allow(priority="transactional").trial
    assert breaker.allow(priority="critical") is None
    # Nobody of a lower priority for the window: critical gets the last trial.
    clock.now += SETTINGS.half_open_priority_window_seconds
    assert breaker.allow(priority="critical").trial
    assert breaker.snapshot()["trials_in_flight"] == SETTINGS.half_open_max_trials


def test_critical_gets_a_trial_when_no_lower_priority_is_around(breaker, clock):
    half_open(breaker, clock)
    permit = breaker.allow(priority="critical")
    assert permit is not None and permit.trial
    # A refused higher-priority caller never holds back a lower one.
    assert breaker.allow(priority="bulk").trial


def test_callers_refused_while_open_count_as_around(breaker, clock):
    trip(breaker)
    clock.now += SETTINGS.open_seconds - 1
    assert breaker.allow(priority="bulk") is None  # bulk is waiting for the circuit
    clock.now += 1
    assert breaker.allow(priority="critical") is None
    assert breaker.allow(priority="bulk").trial


def test_successful_trials_close_it_with_a_fresh_window(breaker, clock):
    half_open(breaker, clock)
    trials = [breaker.allow(priority="bulk") for _ in range(SETTINGS.half_open_successes_to_close)]
    states = [breaker.record(t, failed=False, duration_s=0.2) for t in trials]
    assert states == ["half_open"] * (SETTINGS.half_open_successes_to_close - 1) + ["closed"]
    snap = breaker.snapshot()
    assert (snap["state"], snap["window_calls"], snap["trials_in_flight"]) == ("closed", 0, 0)
    permit = breaker.allow(priority="critical")
    assert permit is not None and not permit.trial


def test_one_failed_trial_reopens_with_a_fresh_timer(breaker, clock):
    half_open(breaker, clock)
    first, second = breaker.allow(priority="bulk"), breaker.allow(priority="bulk")
    assert breaker.record(first, failed=False, duration_s=0.2) == "half_open"
    clock.now += 10
    assert breaker.record(second, failed=True, duration_s=0.2) == "open"
    reopened_at = clock.now
    clock.now = reopened_at + SETTINGS.open_seconds - 0.1
    assert breaker.allow(priority="bulk") is None
    clock.now = reopened_at + SETTINGS.open_seconds
    again = breaker.allow(priority="bulk")
    assert again is not None and again.trial
    assert breaker.snapshot()["half_open_successes"] == 0  # successes before the failure are void
    assert breaker.snapshot()["times_opened"] == 2


def test_a_slow_trial_reopens_it(breaker, clock):
    half_open(breaker, clock)
    trial = breaker.allow(priority="bulk")
    assert breaker.record(trial, failed=False, duration_s=SETTINGS.slow_call_seconds + 1) == "open"


# --- shared state under concurrency -----------------------------------------------------------


def run_workers(workers: list[CircuitBreaker], work) -> None:
    start = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def run(worker: CircuitBreaker) -> None:
        try:
            start.wait()
            work(worker)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_concurrent_records_keep_the_window_exact(client, clock):
    wide = CircuitSettings(window_size=400, minimum_calls=400, failure_rate_threshold=1.0)
    workers = [another_worker(clock, wide) for _ in range(8)]

    def work(worker: CircuitBreaker) -> None:
        for i in range(50):
            permit = worker.allow(priority="bulk")
            worker.record(permit, failed=i % 2 == 0, duration_s=0.1)

    run_workers(workers, work)
    snap = workers[0].snapshot()
    assert (snap["state"], snap["window_calls"], snap["window_failures"]) == ("closed", 400, 200)


def test_concurrent_failures_open_it_exactly_once(client, clock):
    workers = [another_worker(clock) for _ in range(8)]
    permits = {id(w): [w.allow(priority="bulk") for _ in range(50)] for w in workers}

    def work(worker: CircuitBreaker) -> None:
        for permit in permits[id(worker)]:
            worker.record(permit, failed=True, duration_s=0.1)

    run_workers(workers, work)
    snap = workers[0].snapshot()
    # The call that reached the threshold opened it; the 390 recorded after belong to a closed
    # circuit that no longer exists and change nothing.
    assert (snap["state"], snap["times_opened"]) == ("open", 1)
    assert (snap["window_calls"], snap["window_failures"]) == (SETTINGS.minimum_calls, SETTINGS.minimum_calls)


# --- Redis unreachable: fail open -------------------------------------------------------------


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(circuit, "_warn_fail_open", circuit._FailOpenWarning())


def unguarded_client(port: int) -> redis.Redis:
    # Built like providers.redis_state.shared_redis (from_url: no retries), with shorter timeouts.
    return redis.Redis.from_url(f"redis://127.0.0.1:{port}/13", socket_timeout=0.1, socket_connect_timeout=0.1)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_redis_fails_open_and_warns_once(clock, caplog, fresh_warning):
    client = unguarded_client(closed_port())
    breaker = CircuitBreaker("twilio", SETTINGS, client=client, clock=clock)
    with caplog.at_level(logging.WARNING, logger="providers.circuit"):
        permits = [breaker.allow(priority="critical") for _ in range(3)]
        assert all(p is not None and not p.trial and p.fail_open for p in permits)
        assert breaker.record(permits[0], failed=True, duration_s=0.1) == "closed"
        assert breaker.state() == "closed"
        assert breaker.snapshot()["failing_open"] is True
    warnings = [r for r in caplog.records if "failing open" in r.getMessage()]
    assert len(warnings) == 1


def test_redis_that_does_not_answer_fails_open(clock, fresh_warning):
    with socket.socket() as silent:  # accepts connections, never replies: a hung Redis
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = unguarded_client(silent.getsockname()[1])
        breaker = CircuitBreaker("twilio", SETTINGS, client=client, clock=clock)
        permit = breaker.allow(priority="bulk")
        assert permit is not None and permit.fail_open
        client.close()


def test_a_fail_open_permit_is_not_recorded_once_redis_is_back(breaker):
    permit = Permit("twilio", trial=False, issued_at=T0, fail_open=True)
    assert breaker.record(permit, failed=True, duration_s=0.1) == "closed"
    assert breaker.snapshot()["window_calls"] == 0


# --- keys -------------------------------------------------------------------------------------


def test_keys_are_namespaced_and_expire(breaker, client, clock):
    half_open(breaker, clock)
    breaker.allow(priority="bulk")
    keys = sorted(k.decode() for k in client.keys("*"))
    # One hash tag, {circuit:twilio}, for all of them: a Redis Cluster keeps them in one slot.
    assert keys == [f"conductor:{{circuit:twilio}}:{name}" for name in ("asked", "state", "trials", "window")]
    for key in keys:
        assert 0 < client.ttl(key) <= SETTINGS.idle_ttl_seconds


def test_providers_do_not_share_state(breaker, client, clock):
    trip(breaker)
    vonage = CircuitBreaker("vonage", SETTINGS, client=client, clock=clock)
    assert vonage.state() == "closed"
    assert vonage.allow(priority="critical") is not None


def test_reset_closes_it(breaker, client):
    trip(breaker)
    breaker.reset()
    assert breaker.state() == "closed"
    assert client.keys("conductor:{circuit:twilio}:*") == []


def test_unknown_priority_is_refused_loudly(breaker):
    with pytest.raises(ValueError):
        breaker.allow(priority="urgent")


def test_settings_that_cannot_work_are_rejected():
    with pytest.raises(ValueError):
        replace(SETTINGS, minimum_calls=SETTINGS.window_size + 1)
    with pytest.raises(ValueError):
        replace(SETTINGS, failure_rate_threshold=0)


# --- many outcomes at once (the bulk send path) --------------------------------------------------


def test_record_many_counts_like_one_record_per_call(breaker):
    permit = breaker.allow(priority="bulk")
    breaker.record_many([(permit, False, 0.1)] * 11 + [(permit, True, 0.1)] * 8 + [(permit, False, 20.0)])
    snap = breaker.snapshot()
    # the slow success counts as a failure: 9 of 20, still closed; one more failure opens it
    assert (snap["state"], snap["window_calls"], snap["window_failures"]) == ("closed", 20, 9)
    breaker.record_many([(permit, True, 0.1)])
    assert breaker.state() == "open"


def test_record_many_closes_a_half_open_circuit_with_its_trials(breaker, clock):
    half_open(breaker, clock)
    trials = [breaker.allow(priority="bulk") for _ in range(SETTINGS.half_open_successes_to_close)]
    breaker.record_many([(trial, False, 0.2) for trial in trials])
    assert breaker.state() == "closed"


def test_record_many_without_redis_fails_open(clock, fresh_warning):
    down = CircuitBreaker("twilio", SETTINGS, client=redis.Redis(port=1, socket_connect_timeout=0.2), clock=clock)
    permit = down.allow(priority="bulk")
    assert permit is not None and permit.fail_open
    down.record_many([(permit, True, 0.1), (Permit("twilio", trial=False, issued_at=T0), True, 0.1)])


def test_a_forced_open_refuses_every_call_and_leaves_the_stored_state_alone(breaker, client):
    call(breaker, failed=False)
    breaker.force_open(seconds=60, reason="drill:7")
    assert breaker.allow(priority="critical") is None
    assert another_worker(breaker.clock).allow(priority="bulk") is None
    snapshot = breaker.snapshot()
    assert snapshot["state"] == circuit.OPEN and snapshot["forced"] and snapshot["forced_reason"] == "drill:7"
    assert 55 < snapshot["forced_until"] - breaker.clock() <= 60
    assert client.hget(breaker.keys["state"], "state") is None  # still closed underneath, window kept
    assert snapshot["window_calls"] == 1

    assert breaker.clear_forced() is True
    assert breaker.allow(priority="critical") is not None
    assert breaker.snapshot()["forced"] is False and breaker.state() == circuit.CLOSED
    assert breaker.clear_forced() is False


def test_a_forced_open_expires_by_itself(breaker, client):
    # A drill that dies cannot leave its provider out of traffic: the key carries its own expiry.
    breaker.force_open(seconds=0.2, reason="drill:8")
    assert breaker.allow(priority="bulk") is None
    assert 0 < client.pttl(breaker.keys["forced"]) <= 200
    client.pexpire(breaker.keys["forced"], 1)
    for _ in range(100):
        if not client.exists(breaker.keys["forced"]):
            break
        threading.Event().wait(0.01)
    assert breaker.allow(priority="bulk") is not None
    assert breaker.state() == circuit.CLOSED


def test_force_open_needs_a_positive_duration(breaker):
    with pytest.raises(ValueError):
        breaker.force_open(seconds=0, reason="x")


def test_reset_clears_a_forced_open(breaker):
    breaker.force_open(seconds=60, reason="drill:9")
    breaker.reset()
    assert breaker.allow(priority="bulk") is not None
