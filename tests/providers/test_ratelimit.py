"""The per-provider rate limiter against a real Redis (DB 12), with an injected clock where possible."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from providers import ratelimit
from providers.ratelimit import RateLimit, RateLimiter, wait_for_slot

REDIS_URL = "redis://127.0.0.1:6379/12"
T0 = 1_700_000_000.0  # an injected "now"; far from the real clock on purpose


@pytest.fixture
def client():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def warnings_reset(monkeypatch):
    """A fresh once-per-30-s warning throttle, on a clock the test moves."""
    clock = [0.0]
    monkeypatch.setattr(ratelimit, "_redis_down_warning", ratelimit._ThrottledWarning(clock=lambda: clock[0]))
    return clock


def limiter(client, per_second=10.0, burst=None, provider="twilio"):
    return RateLimiter(provider, RateLimit(per_second=per_second, burst=burst), client=client)


def test_default_burst_is_one_second_worth():
    assert RateLimit(per_second=400).effective_burst == 400
    assert RateLimit(per_second=0.2).effective_burst == 1
    assert RateLimit(per_second=10, burst=3).effective_burst == 3


@pytest.mark.parametrize("bad", [{"per_second": -1}, {"per_second": 5, "burst": 0}, {"max_inline_wait_seconds": -1}])
def test_rejects_nonsense_settings(bad):
    with pytest.raises(ValueError):
        RateLimit(**bad)


def test_cold_start_lets_through_only_the_burst_then_the_steady_rate(client):
    bucket = limiter(client, per_second=8, burst=4)  # 1/8 s: exact in binary, so == is fair
    assert [bucket.acquire(now=T0) for _ in range(4)] == [0.0] * 4
    assert bucket.acquire(now=T0) == 0.125
    assert bucket.acquire(now=T0 + 0.0625) == 0.0625  # the wait returned counts down
    # Refused attempts took nothing: exactly one token per 1/8 s from here on.
    for step in range(1, 17):
        now = T0 + step * 0.125
        assert bucket.acquire(now=now) == 0.0
        assert bucket.acquire(now=now) == 0.125
    # Idle for a second refills the burst, not more.
    later = T0 + 2.0 + 1.0
    assert [bucket.acquire(now=later) for _ in range(5)] == [0.0] * 4 + [0.125]


def test_reserve_hands_out_consecutive_slots_only_within_max_wait(client):
    bucket = limiter(client, per_second=8, burst=1)
    assert [bucket.reserve(now=T0, max_wait_s=0.3) for _ in range(3)] == [0.0, 0.125, 0.25]
    # The next slot is 0.375 s away: nothing reserved, so asking again gives the same answer.
    assert bucket.reserve(now=T0, max_wait_s=0.3) == 0.375
    assert bucket.reserve(now=T0, max_wait_s=0.3) == 0.375
    assert bucket.acquire(now=T0 + 0.375) == 0.0


def test_wait_for_slot_sleeps_short_waits_and_returns_long_ones_without_taking_a_token(client):
    bucket = limiter(client, per_second=2, burst=1)
    slept = []
    assert wait_for_slot(bucket, max_inline_wait_s=1.0, sleep=slept.append) == 0.0
    assert wait_for_slot(bucket, max_inline_wait_s=1.0, sleep=slept.append) == 0.0
    assert slept == [pytest.approx(0.5, abs=0.05)]
    # Slots at +0, +0.5 are taken; the next is ~1 s out, over a 0.6 s inline budget: reschedule.
    countdown = wait_for_slot(bucket, max_inline_wait_s=0.6, sleep=slept.append)
    assert countdown == pytest.approx(1.0, abs=0.05)
    assert len(slept) == 1
    # The rescheduled message took nothing: a second caller still finds the same slot.
    assert bucket.reserve(max_wait_s=0.6) == pytest.approx(countdown, abs=0.05)


def test_wait_for_slot_defaults_to_the_limits_inline_budget(client):
    bucket = RateLimiter("vonage", RateLimit(per_second=1, max_inline_wait_seconds=0.0), client=client)
    assert wait_for_slot(bucket) == 0.0
    assert wait_for_slot(bucket) == pytest.approx(1.0, abs=0.05)


def test_penalize_blocks_every_worker_until_retry_after_then_refills_from_empty(client):
    worker_a = limiter(client, per_second=8, burst=4)
    worker_b = RateLimiter("twilio", RateLimit(per_second=8, burst=4), client=redis.Redis.from_url(REDIS_URL))
    assert worker_a.acquire(now=T0) == 0.0

    worker_a.penalize(3.0, now=T0)
    assert worker_b.acquire(now=T0) == 3.0
    assert worker_b.acquire(now=T0 + 2.5) == 0.5
    assert worker_a.acquire(now=T0 + 2.875) == 0.125
    # A shorter Retry-After does not shorten the penalty.
    worker_b.penalize(1.0, now=T0 + 1.0)
    assert worker_a.acquire(now=T0 + 2.75) == 0.25

    # From T0 + 3 the bucket refills from empty: one send, then one per 1/8 s, no burst.
    assert worker_b.acquire(now=T0 + 3.0) == 0.0
    assert worker_a.acquire(now=T0 + 3.0) == 0.125
    assert worker_a.acquire(now=T0 + 3.125) == 0.0
    assert worker_b.acquire(now=T0 + 3.125) == 0.125
    # The burst only comes back with idle time.
    assert [worker_a.acquire(now=T0 + 4.125) for _ in range(5)] == [0.0] * 4 + [0.125]


def test_providers_do_not_share_a_bucket(client):
    twilio, vonage = limiter(client, 1, provider="twilio"), limiter(client, 1, provider="vonage")
    assert twilio.acquire(now=T0) == 0.0
    assert twilio.acquire(now=T0) > 0
    assert vonage.acquire(now=T0) == 0.0


def test_keys_are_namespaced_and_expire(client):
    bucket = limiter(client, per_second=10, burst=5, provider="mailgun")
    bucket.acquire(now=time.time())
    assert client.keys("*") == [b"conductor:ratelimit:mailgun:tat"]
    assert 0 < client.pttl(bucket.key) <= (ratelimit.KEY_TTL_MARGIN_S + 1) * 1000

    bucket.penalize(120, now=time.time())
    assert 120_000 < client.pttl(bucket.key) <= (120 + 1 + ratelimit.KEY_TTL_MARGIN_S) * 1000


class NoRedis:
    """A client that fails the test if anything at all is asked of it."""

    def __getattr__(self, name):
        raise AssertionError(f"unlimited limiter touched Redis: {name}")


@pytest.mark.parametrize("per_second", [None, 0])
def test_unlimited_never_calls_redis(per_second):
    bucket = RateLimiter("smtp", RateLimit(per_second=per_second), client=NoRedis())
    assert [bucket.acquire() for _ in range(1000)] == [0.0] * 1000
    assert bucket.reserve(max_wait_s=0) == 0.0
    bucket.penalize(30)
    assert wait_for_slot(bucket, max_inline_wait_s=0, sleep=lambda s: pytest.fail("slept")) == 0.0


def test_unreachable_redis_fails_open_with_one_warning_per_30s(caplog, warnings_reset):
    # A closed port, no retries: the failure itself must be instant.
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    bucket = RateLimiter("twilio", RateLimit(per_second=1, burst=1), client=dead)
    other = RateLimiter("vonage", RateLimit(per_second=1, burst=1), client=dead)
    caplog.set_level(logging.WARNING, logger="providers.ratelimit")

    assert [bucket.acquire() for _ in range(5)] == [0.0] * 5
    assert other.reserve(max_wait_s=0) == 0.0
    other.penalize(10)
    assert wait_for_slot(bucket, max_inline_wait_s=0) == 0.0
    assert len(caplog.records) == 1
    assert "twilio" in caplog.records[0].getMessage()

    warnings_reset[0] += 29.9
    bucket.acquire()
    assert len(caplog.records) == 1
    warnings_reset[0] += 0.2
    bucket.acquire()
    assert len(caplog.records) == 2


def test_concurrent_workers_never_exceed_burst_plus_rate_times_elapsed(client):
    """8 threads, 1 s of real time at 50/s: half poll acquire(), half reserve slots and sleep."""
    rate, burst, duration = 50.0, 10, 1.0
    shared = RateLimiter("twilio", RateLimit(per_second=rate, burst=burst), client=client)
    sends: list[float] = []
    lock = threading.Lock()
    start = time.time()
    deadline = start + duration

    def poller():
        while (now := time.time()) < deadline:
            if shared.acquire(now=now) == 0.0:
                with lock:
                    sends.append(now)

    def sleeper():
        while (now := time.time()) < deadline:
            wait = shared.reserve(now=now, max_wait_s=0.1)
            if wait <= 0.1:
                with lock:
                    sends.append(now + wait)  # the slot this worker was given
                time.sleep(wait)

    threads = [threading.Thread(target=poller if i % 2 else sleeper) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    sends.sort()
    worst = float("-inf")
    # Every interval between two sends, both ends included: the binding windows.
    for i in range(len(sends)):
        for j in range(i, len(sends)):
            count, elapsed = j - i + 1, sends[j] - sends[i]
            worst = max(worst, count - burst - rate * elapsed)
    # A real excess is a whole send. The slack covers float rounding only: epoch seconds have a
    # 0.24 µs resolution, so ~50 slot additions drift by a few µs (~1e-4 of a send here).
    assert worst <= 1e-3, worst
    # Not starved either: close to what the limit allows over the run (slots up to 0.1 s late).
    assert len(sends) >= burst + rate * duration * 0.9
    assert len(sends) <= burst + rate * (duration + 0.1) + 1
