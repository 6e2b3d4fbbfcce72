"""Starting callback delivery: the kick the outbox writer sends on commit, and the sweeper's check.

One deliverer at a time is the normal case (messaging.callbacks.delivery runs a loop over every
due callback, bounded per endpoint): a Redis flag says one is running or queued, so a burst of
transitions publishes one task, not one each. The flag expires (FLAG_TTL_S) unless the running
deliverer refreshes it, so a deliverer killed with it set holds kicks off for seconds at most;
the sweeper kicks every tick while due callbacks wait. Nothing here raises into the caller: the
callbacks are committed rows, and a lost kick is only a delay.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from celery import current_app
from django.db import connection

from messaging.models import Callback
from providers.redis_state import shared_redis

logger = logging.getLogger(__name__)

DELIVER_TASK = "messaging.deliver_callbacks"
CALLBACKS_QUEUE = "callbacks"
# Set while a deliverer is queued or running (it refreshes it every FLAG_REFRESH_S).
RUNNING_KEY = "conductor:callbacks:deliverer"
# Long enough to cover a task waiting its turn in the queue and a deliverer's slowest round;
# short enough that a killed deliverer's flag stops no kick for long.
FLAG_TTL_S = 10
FLAG_REFRESH_S = 3.0
# Endpoints whose circuit is open, scored by when they may be tried again (unix seconds): their
# due callbacks are neither claimed nor a reason to kick until then.
PAUSED_KEY = "conductor:callbacks:paused"


def callbacks_kick() -> bool:
    """Publish a deliverer unless one is queued or running; returns whether one was published.
    Cheap (one Redis SET NX) and never raises: a failed publish is logged and the sweeper kicks."""
    try:
        if not shared_redis().set(RUNNING_KEY, 1, nx=True, ex=FLAG_TTL_S):
            return False
    except Exception:  # Redis down: publish anyway (a deliverer too many costs one empty claim)
        logger.info("callback kick: Redis unavailable, publishing without coalescing")
        return _publish()
    if _publish():
        return True
    try:  # nothing was published: let the next kick try
        shared_redis().delete(RUNNING_KEY)
    except Exception:
        pass
    return False


def _publish() -> bool:
    try:
        current_app.send_task(DELIVER_TASK, queue=CALLBACKS_QUEUE, retry=False)
    except Exception:
        logger.warning("could not publish the callback deliverer; the sweeper will", exc_info=True)
        return False
    return True


def deliverer_publish_next() -> bool:
    """A deliverer whose time budget is spent hands over to a new task (its flag stays set)."""
    deliverer_mark_running()
    return _publish()


def deliverer_mark_running() -> None:
    try:
        shared_redis().set(RUNNING_KEY, 1, ex=FLAG_TTL_S)
    except Exception:
        pass


def deliverer_clear_running() -> None:
    try:
        shared_redis().delete(RUNNING_KEY)
    except Exception:
        pass


def endpoints_pause(pauses: dict[int, float]) -> None:
    """Hold these endpoints' callbacks back until the given unix times (their circuits are open)."""
    if not pauses:
        return
    try:
        shared_redis().zadd(PAUSED_KEY, {str(endpoint_id): until for endpoint_id, until in pauses.items()})
    except Exception:  # without the set every deliverer finds the open circuit itself, by asking it
        logger.info("callback pause not stored: Redis unavailable")


def endpoints_paused(now: float | None = None, *, beyond: float | None = None) -> list[int]:
    """Endpoints held back now, or (`beyond`, unix seconds) still then; an empty list when Redis
    does not answer (their circuits say no)."""
    now = time.time() if now is None else now
    try:
        client = shared_redis()
        pipe = client.pipeline(transaction=False)
        pipe.zremrangebyscore(PAUSED_KEY, "-inf", now)
        pipe.zrangebyscore(PAUSED_KEY, f"({max(now, beyond or now)}", "+inf")
        _, members = pipe.execute()
    except Exception:
        return []
    return [int(member) for member in members]


# A pending callback that could be claimed by `until`: its lease free, at an endpoint not left out,
# and the head of its (message, endpoint) sequence (one behind an earlier pending callback waits
# for that one, however long its backoff: it is no reason to run a deliverer).
_DUE_SQL = """
SELECT EXISTS (
    SELECT 1 FROM {callback} c
    WHERE c.state = 'pending' AND c.next_attempt_at <= %(until)s
      AND (c.lease_expires_at IS NULL OR c.lease_expires_at < %(now)s)
      AND NOT (c.endpoint_id = ANY(%(left_out)s::bigint[]))
      AND NOT EXISTS (
          SELECT 1 FROM {callback} e
          WHERE e.message_id = c.message_id AND e.endpoint_id = c.endpoint_id
            AND e.sequence < c.sequence AND e.state = 'pending'
      )
)
"""


def callbacks_due_within(*, now: datetime, seconds: float = 0.0, left_out: list[int] | None = None) -> bool:
    """Whether a callback comes due within `seconds` that a deliverer could claim (a lost kick,
    a retry whose time came, a lease a dead worker left), at an endpoint neither in `left_out` nor
    held back by its circuit."""
    # An endpoint whose pause ends within `seconds` counts: its callbacks come due then.
    paused = endpoints_paused(now.timestamp(), beyond=now.timestamp() + seconds)
    excluded = sorted({*(left_out or []), *paused})
    params = {"now": now, "until": now + timedelta(seconds=seconds), "left_out": excluded}
    with connection.cursor() as cursor:
        cursor.execute(_DUE_SQL.format(callback=Callback._meta.db_table), params)
        return bool(cursor.fetchone()[0])


def callbacks_sweep(*, now: datetime) -> bool:
    """The sweeper's part (every tick): kick the deliverer when due callbacks wait. Returns
    whether a deliverer was published."""
    return callbacks_due_within(now=now) and callbacks_kick()
