"""Shared state on a Redis Cluster (REDIS_CLUSTER): three local cluster nodes this module starts,
the breakers, rate limits and every other state key through the real code (the factory's cluster
client, no mocks), and each Lua script's keys in one hash slot."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from django.core.cache import caches
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, RedisClusterException

from messaging.callbacks.trigger import PAUSED_KEY, endpoints_pause, endpoints_paused
from messaging.limits import QUOTA_KEY, quota_take
from messaging.models import ApiClient
from messaging.queue_progress import KEY as QUEUE_PROGRESS_KEY
from messaging.queue_progress import queue_consumed, queues_consumed
from providers import circuit
from providers.circuit import ALLOW_LUA, CircuitBreaker, CircuitSettings
from providers.ratelimit import RateLimit, RateLimiter
from providers.redis_state import reset_shared_redis, shared_redis
from providers.types import WebhookReplayError
from providers.webhook_replay import webhook_token_claim
from tests.support.redis_cluster import LocalRedisCluster

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
BREAKER = CircuitSettings(open_seconds=30.0)


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def cluster(request):
    nodes = LocalRedisCluster()
    request.addfinalizer(nodes.stop)  # before start: a node that started is stopped whatever fails next
    try:
        return nodes.start()
    except Exception:
        pytest.fail(f"the local Redis Cluster did not form:\n{nodes.logs()}")


@pytest.fixture
def on_cluster(cluster, settings):
    """The settings a deployment with REDIS_CLUSTER=true has; every test starts on an empty cluster."""
    settings.REDIS_URL, settings.REDIS_CLUSTER = cluster.url, True
    reset_shared_redis()
    assert isinstance(shared_redis(), RedisCluster)
    shared_redis().flushall()
    yield cluster
    shared_redis().close()
    reset_shared_redis()


def own_client(cluster: LocalRedisCluster) -> RedisCluster:
    """A cluster client of its own: what another worker process or host holds."""
    return RedisCluster.from_url(cluster.url, socket_timeout=0.5)


def breaker_script_keys(name: str) -> dict[str, list[str]]:
    """The keys each breaker script is run with, as CircuitBreaker passes them."""
    keys = CircuitBreaker(name, BREAKER).keys  # connects to nothing until used
    return {
        "allow": [keys[part] for part in ("state", "window", "trials", "asked", "forced")],
        "record": [keys[part] for part in ("state", "window", "trials")],
        "snapshot and reset": list(keys.values()),
    }


# --- one slot per script --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["twilio", "vonage", "callback:42"])
def test_each_breaker_script_touches_one_slot_and_the_old_key_layout_did_not(name):
    for use, keys in breaker_script_keys(name).items():
        assert len({key_slot(key.encode()) for key in keys}) == 1, (use, keys)
    # The check can fail: the layout before hash tags spread one breaker over several slots.
    legacy = [f"conductor:circuit:{name}:{part}" for part in circuit.KEY_PARTS]
    assert len({key_slot(key.encode()) for key in legacy}) > 1


def test_the_cluster_agrees_on_the_slots_and_answers_crossslot_to_a_script_that_spans_them(on_cluster):
    node = on_cluster.node(0)
    for keys in breaker_script_keys("twilio").values():
        assert {node.cluster("keyslot", key) for key in keys} == {key_slot(keys[0].encode())}
    # Single-key scripts (rate limit, quota, queue watermarks): one slot by construction.
    quota_key = QUOTA_KEY.format(client=7, channel="sms", day="20260101")
    for key in (RateLimiter("twilio", RateLimit(per_second=1)).key, quota_key, QUEUE_PROGRESS_KEY):
        assert node.cluster("keyslot", key) == key_slot(key.encode())

    # What the cluster does with the breaker's script over the old, untagged keys: refuse it,
    # from the server (CROSSSLOT) and already in the client.
    legacy = [f"conductor:circuit:twilio:{part}" for part in circuit.KEY_PARTS]
    args = [T0, 0, 30, 3, 60, 5, 3600, "trial"]
    with pytest.raises(ClusterCrossSlotError):  # redis-py's class for the server's CROSSSLOT error
        node.eval(ALLOW_LUA, len(legacy), *legacy, *args)
    with pytest.raises(RedisClusterException, match="same key slot"):
        shared_redis().eval(ALLOW_LUA, len(legacy), *legacy, *args)
    tagged = breaker_script_keys("twilio")["allow"]
    assert shared_redis().eval(ALLOW_LUA, len(tagged), *tagged, *args)[0] == 1


# --- breakers -------------------------------------------------------------------------------------


def test_a_breaker_opens_goes_half_open_and_closes_across_workers(on_cluster):
    clock = Clock()
    worker_a = CircuitBreaker("twilio", BREAKER, clock=clock)  # the factory's client: the cluster
    worker_b = CircuitBreaker("twilio", BREAKER, client=own_client(on_cluster), clock=clock)

    for _ in range(BREAKER.minimum_calls):
        permit = worker_a.allow(priority="bulk")
        assert permit is not None and not permit.fail_open  # the state answered: no failing open
        state = worker_a.record(permit, failed=True, duration_s=0.1)
    assert state == circuit.OPEN
    assert worker_b.allow(priority="critical") is None  # the other worker sees it open
    assert worker_b.snapshot()["state"] == circuit.OPEN

    clock.now += BREAKER.open_seconds
    trials = [worker_b.allow(priority="bulk") for _ in range(BREAKER.half_open_max_trials)]
    assert all(permit is not None and permit.trial for permit in trials)
    assert worker_a.allow(priority="bulk") is None  # the trial cap is shared too
    assert worker_a.state() == circuit.HALF_OPEN

    # The bulk path's batch record (one script run over several calls) closes it.
    worker_b.record_many([(permit, False, 0.1) for permit in trials])
    snapshot = worker_a.snapshot()  # a MULTI/EXEC over the breaker's keys: one slot
    assert (snapshot["state"], snapshot["times_opened"], snapshot["failing_open"]) == (circuit.CLOSED, 1, False)
    assert worker_a.allow(priority="critical") is not None

    worker_a.force_open(seconds=60, reason="drill")
    assert worker_b.allow(priority="critical") is None
    assert worker_b.clear_forced() is True
    worker_a.reset()  # one DEL over every key of the breaker
    assert not any(shared_redis().exists(key) for key in worker_a.keys.values())


# --- rate limits ----------------------------------------------------------------------------------


def test_a_rate_limit_holds_when_two_clients_share_it(on_cluster):
    """Two limiters of one provider on two cluster clients (two workers), four threads each,
    1.5 s of real time at 20/s: together they never pass burst + rate × elapsed."""
    rate, duration = 20.0, 1.5
    limit = RateLimit(per_second=rate, burst=1)
    workers = {"a": RateLimiter("twilio", limit), "b": RateLimiter("twilio", limit, client=own_client(on_cluster))}
    sends: list[tuple[float, str]] = []
    lock = threading.Lock()
    deadline = time.time() + duration

    def send(worker: str) -> None:
        while (now := time.time()) < deadline:
            wait = workers[worker].reserve(now=now, max_wait_s=0.05)
            if wait <= 0.05:
                with lock:
                    sends.append((now + wait, worker))  # the slot this worker was given
                time.sleep(wait)

    threads = [threading.Thread(target=send, args=(worker,)) for worker in "ab" for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    times = sorted(at for at, _ in sends)
    worst = max(j - i + 1 - 1 - rate * (times[j] - times[i]) for i in range(len(times)) for j in range(i, len(times)))
    assert worst <= 1e-3, worst  # a real excess is a whole send
    # Shared, not one bucket each (that would be twice the rate), and neither worker starved.
    assert 1 + rate * duration * 0.8 <= len(sends) <= 1 + rate * (duration + 0.05) + 1
    assert {worker for _, worker in sends} == {"a", "b"}

    # A provider's 429 told to one worker holds the other back.
    workers["a"].penalize(5.0)
    assert workers["b"].acquire() > 4.0


# --- the other state keys -------------------------------------------------------------------------


def test_quotas_tokens_watermarks_pauses_and_the_api_throttle_work_on_the_cluster(on_cluster):
    now = time.time()
    client = ApiClient(pk=7, name="acme", sms_daily_quota=3)  # unsaved: the quota needs no row
    grant = quota_take(client=client, channel="sms", count=5, now=datetime.now(UTC))
    assert (grant.granted, grant.key is not None) == (3, True)  # counted (a failure fails open: 5)

    webhook_token_claim(provider="mailgun", token="t-1", timestamp=now, max_age_seconds=300)
    with pytest.raises(WebhookReplayError):
        webhook_token_claim(provider="mailgun", token="t-1", timestamp=now, max_age_seconds=300)

    queue_consumed(queue="sms.bulk", published_at=now - 1)
    assert queues_consumed(["sms.bulk"], now=now, moving_within=30) == {"sms.bulk": pytest.approx(now - 1)}

    endpoints_pause({11: now + 60})
    assert endpoints_paused(now) == [11]  # a pipeline on the cluster (both commands on one key)
    assert shared_redis().exists(PAUSED_KEY)

    throttle = caches["throttle"]
    throttle.set("throttle_client_7", [now], 60)
    assert throttle.get("throttle_client_7") == [now]
    assert shared_redis().exists("conductor:1:throttle_client_7")
