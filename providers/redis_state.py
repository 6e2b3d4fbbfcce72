"""The Redis connection for state shared by every worker and web process: one plain Redis, or a
Redis Cluster when settings.REDIS_CLUSTER is on (the Celery broker is never this connection).

Keys (every one starts `conductor:`; docs/operations.md, "Redis Cluster for state", lists them).
A Lua script or a multi-key command must touch one hash slot, or a cluster refuses it (CROSSSLOT):
keys used together carry the same hash tag, the part in braces, e.g. a breaker's
`conductor:{circuit:twilio}:state` and `conductor:{circuit:twilio}:window`. A key only ever used
on its own needs none (`conductor:ratelimit:twilio:tat`).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import redis
from django.conf import settings
from django.core.cache.backends.redis import RedisCache, RedisCacheClient
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry

# Shared state sits on the hot path of every send: a Redis that does not answer quickly is
# treated as unreachable (callers fail open), never waited on.
SOCKET_TIMEOUT_S = 0.5

# What a call on the shared client raises when the state cannot be read or written. The cluster
# client raises RedisClusterException, not a RedisError, when no node answers (and when it cannot
# even be built): callers that fail open must catch both.
STATE_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)

StateClient = redis.Redis | RedisCluster


def hash_tagged_key(kind: str, name: str, part: str) -> str:
    """`conductor:{kind:name}:part`: every part of one kind and name lands in one cluster slot."""
    return f"conductor:{{{kind}:{name}}}:{part}"


@cache
def shared_redis() -> StateClient:
    """One client (and connection pools) per process, for settings.REDIS_URL: a seed node of the
    cluster when settings.REDIS_CLUSTER is on (the others are discovered from it)."""
    options: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        # redis-py retries with backoff by default (seconds per call when Redis is down): fail
        # fast. A cluster's MOVED/ASK redirections are followed regardless of this.
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
    }
    if settings.REDIS_CLUSTER:
        # Connects at once to learn the slot map: raises RedisClusterException when no node
        # answers (not cached, so the next call tries again).
        return RedisCluster.from_url(settings.REDIS_URL, **options)
    return redis.Redis.from_url(settings.REDIS_URL, **options)


def reset_shared_redis() -> None:
    """Forget the client (tests that point REDIS_URL elsewhere call this)."""
    shared_redis.cache_clear()


class _SharedStateCacheClient(RedisCacheClient):
    """Django's Redis cache client on the shared state connection, plain or cluster. Django calls
    get_client() for every operation and lets it choose the server (its documented extension point)."""

    def get_client(self, key: Any = None, *, write: bool = False) -> StateClient:
        return shared_redis()


class StateRedisCache(RedisCache):
    """A Django cache in the shared state Redis (settings.REDIS_URL, a cluster too): the API
    throttle's per-client counts. Its LOCATION is unused. In a cluster only single-key operations
    are safe (get, set, add, incr, delete: all DRF's throttle does); get_many/set_many may span
    slots."""

    def __init__(self, server: str, params: dict[str, Any]):
        super().__init__(server, params)
        self._class = _SharedStateCacheClient
