"""The Redis connection for state shared by every worker (circuit breakers, rate limits)."""

from __future__ import annotations

from functools import cache

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

# Shared state sits on the hot path of every send: a Redis that does not answer quickly is
# treated as unreachable (callers fail open), never waited on.
SOCKET_TIMEOUT_S = 0.5


@cache
def shared_redis() -> redis.Redis:
    """One client (and connection pool) per process, for settings.REDIS_URL."""
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        # redis-py retries with backoff by default (seconds per call when Redis is down): fail fast.
        retry=Retry(NoBackoff(), 0),
        health_check_interval=30,
    )


def reset_shared_redis() -> None:
    """Forget the client (tests that point REDIS_URL elsewhere call this)."""
    shared_redis.cache_clear()
