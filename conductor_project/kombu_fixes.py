"""Two fixes to kombu 5.7's Redis transport, applied at import so a broker restart never kills a worker.

What happened (docs/operations.md, "Broker restarts"): Redis goes away while a worker holds
unacknowledged tasks, with a BRPOP outstanding on its task channel, and the loss is first seen on
the pub/sub socket of its remote-control (pidbox) channel. Celery then calls `connection.collect()`
and `connection.close()` (celery/worker/consumer/consumer.py, on_connection_error_after_connected):

1. collect() closes the task channel: reading the outstanding BRPOP reply raises ConnectionError
   (swallowed). Then `virtual.Transport.close_connection` closes the other channels and stops at
   the first that raises: the pidbox channel's close deletes its fanout binding on the dead server.
   The task channel stays open, and collect() detaches the transport (`transport.client = None`).
2. close() closes the task channel again: it drops its Redis pool, then restores its unacked
   messages, which rebuilds the pool from `self.connection.client.hostname`, now None:
   AttributeError. That is no connection error, so Celery does not reconnect: "Unrecoverable
   error: AttributeError('NoneType' object has no attribute 'hostname')" and the worker exits. Its
   in-flight tasks' acks would fail the same way.

Fix 1 (`close_every_channel`): close_connection closes every channel, whatever one raises, and
re-raises the first error afterwards (callers already ignore connection errors here), so no
channel outlives its transport. Fix 2 (`detached_channel_is_a_connection_error`): a channel whose
transport was detached raises redis' ConnectionError, which kombu and Celery treat as a lost
connection (Celery logs "Couldn't ack" and goes on) instead of AttributeError. The same idea as
upstream's fix for the stale-fd KeyError after a broker restart (celery/kombu#2582, #2592).
Reported upstream as a note (docs/operations.md); re-check on every kombu upgrade whether
`tests/test_kombu_fixes.py` still fails without these and drop them when it no longer does.
"""

from __future__ import annotations

import functools
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ConnectionError as RedisConnectionError

_APPLIED = "_conductor_fixed"
# The kombu whose close_connection `close_every_channel` replaces (a copy of its body that goes on
# past a failing channel): tests/test_kombu_fixes.py fails on any other, to have it read again.
VERIFIED_KOMBU = "5.7.0"


def close_every_channel(close_connection: Any) -> Any:
    """virtual.Transport.close_connection that does not leave channels open when one close fails."""

    @functools.wraps(close_connection)
    def patched(self: virtual.Transport, connection: Any) -> None:
        self.cycle.close()
        first_error: BaseException | None = None
        for channels in (self._avail_channels, self.channels):
            while channels:
                try:
                    channel = channels.pop()
                except LookupError:  # pragma: no cover - emptied concurrently
                    break
                try:
                    channel.close()
                except Exception as exc:
                    first_error = first_error or exc
        if first_error is not None:
            raise first_error

    setattr(patched, _APPLIED, True)
    return patched


def detached_channel_is_a_connection_error(connparams: Any) -> Any:
    """Channel._connparams raising ConnectionError, not AttributeError, once the transport is detached."""

    @functools.wraps(connparams)
    def patched(self: kombu_redis.Channel, *args: Any, **kwargs: Any) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is None:
            raise RedisConnectionError("kombu channel used after its broker connection was closed")
        return connparams(self, *args, **kwargs)

    setattr(patched, _APPLIED, True)
    return patched


def apply() -> None:
    """Install both fixes once per process (idempotent)."""
    if not getattr(virtual.Transport.close_connection, _APPLIED, False):
        virtual.Transport.close_connection = close_every_channel(virtual.Transport.close_connection)
    if not getattr(kombu_redis.Channel._connparams, _APPLIED, False):
        kombu_redis.Channel._connparams = detached_channel_is_a_connection_error(kombu_redis.Channel._connparams)
