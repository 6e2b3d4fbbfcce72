"""The shared state client: plain or cluster (REDIS_CLUSTER), failing open when a cluster does not
answer, and the settings checks that keep the broker off the cluster. The cluster itself:
tests/integration/test_redis_cluster.py."""

from __future__ import annotations

import pytest
import redis
from django.core.cache import caches
from django.core.checks import run_checks
from django.utils import timezone
from redis.exceptions import RedisClusterException

from messaging.limits import quota_take
from messaging.models import ApiClient
from providers.circuit import CLOSED, CircuitBreaker, CircuitSettings
from providers.ratelimit import RateLimit, RateLimiter
from providers.redis_state import STATE_ERRORS, hash_tagged_key, reset_shared_redis, shared_redis
from providers.types import WebhookStateUnavailable
from providers.webhook_replay import webhook_token_claim
from tests.support.processes import free_port


@pytest.fixture
def cluster_down(settings):
    """REDIS_CLUSTER on, and no node answering at the seed."""
    settings.REDIS_URL, settings.REDIS_CLUSTER = f"redis://127.0.0.1:{free_port()}/0", True
    reset_shared_redis()
    yield
    reset_shared_redis()


def test_the_state_client_is_a_plain_redis_unless_the_cluster_is_asked_for(settings):
    assert settings.REDIS_CLUSTER is False
    assert type(shared_redis()) is redis.Redis
    assert shared_redis() is shared_redis()  # one per process


def test_hash_tags_name_kind_and_name():
    assert hash_tagged_key("circuit", "twilio", "state") == "conductor:{circuit:twilio}:state"


def test_a_cluster_that_does_not_answer_is_an_error_callers_fail_open_on(cluster_down):
    with pytest.raises(RedisClusterException):  # not a RedisError: callers catch STATE_ERRORS
        shared_redis()
    assert issubclass(RedisClusterException, STATE_ERRORS)


def test_with_the_cluster_down_breakers_limits_quotas_and_the_throttle_fail_open(cluster_down):
    breaker = CircuitBreaker("twilio", CircuitSettings())  # builds no client yet
    permit = breaker.allow(priority="critical")
    assert permit is not None and permit.fail_open
    assert breaker.record(permit, failed=True, duration_s=0.1) == CLOSED
    breaker.record_many([(permit, True, 0.1)])
    assert breaker.snapshot()["failing_open"] is True

    assert RateLimiter("twilio", RateLimit(per_second=1, burst=1)).reserve(max_wait_s=0) == 0.0
    acme = ApiClient(pk=7, name="acme", sms_daily_quota=1)
    grant = quota_take(client=acme, channel="sms", count=5, now=timezone.now())
    assert (grant.key, grant.granted) == (None, 5)
    with pytest.raises(WebhookStateUnavailable):  # refused, never let through as "not a replay"
        webhook_token_claim(provider="mailgun", token="t", timestamp=timezone.now().timestamp(), max_age_seconds=300)
    with pytest.raises(STATE_ERRORS):  # the throttle catches these and lets the request through
        caches["throttle"].get("throttle_client_7")


def _state_redis_errors() -> list[str]:
    return sorted(e.id for e in run_checks() if e.id in ("conductor.E110", "conductor.E111"))


@pytest.mark.parametrize(
    ("redis_url", "broker_url", "expected"),
    [
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.9:6379/0", []),
        ("redis://10.0.0.5:6379", "amqp://guest:guest@10.0.0.9:5672//", []),
        ("redis://10.0.0.5:6379/3", "redis://10.0.0.9:6379/0", ["conductor.E110"]),
        ("unix:///run/redis.sock", "redis://10.0.0.9:6379/0", ["conductor.E110"]),
        ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/1", ["conductor.E111"]),  # the default: the same
    ],
)
def test_a_cluster_for_state_needs_db_0_and_a_broker_of_its_own(settings, redis_url, broker_url, expected):
    settings.REDIS_URL, settings.CELERY_BROKER_URL, settings.REDIS_CLUSTER = redis_url, broker_url, True
    assert _state_redis_errors() == expected
    settings.REDIS_CLUSTER = False
    assert _state_redis_errors() == []
