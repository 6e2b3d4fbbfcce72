"""Publishing dispatch triggers: the row is the queue of record, a task only says "look at it now"."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Collection, Iterable
from typing import Any

from celery import current_app
from celery.utils.quorum_queues import detect_quorum_queues

from messaging.conf import messaging_setting
from messaging.fair import fair_sharing
from messaging.routing import Priority, queue_name

logger = logging.getLogger(__name__)

DISPATCH_TASK = "messaging.dispatch"
DISPATCH_BATCH_TASK = "messaging.dispatch_batch"
# The channel's next fair batch (messaging.fair): one per BULK_BATCH_SIZE bulk messages published.
DISPATCH_BULK_TASK = "messaging.dispatch_bulk"


def message_publish(*, message_id: Any, channel: str, priority: str, countdown: float | None = None) -> bool:
    """Send the dispatch task to the message's queue. A broker failure is logged, not raised:

    the row is the queue of record and the sweeper enqueues it again, so nothing is lost.
    """
    if countdown is not None and countdown < 1 and _countdowns_in_whole_seconds():
        countdown = None  # published now: a claim takes a retry up to EARLY_TOLERANCE (1 s) early
    try:
        current_app.send_task(
            DISPATCH_TASK,
            args=[str(message_id)],
            # A header, not an argument: a worker of the previous release ignores it (messaging.queue_progress).
            headers={"published_at": time.time()},
            queue=queue_name(channel, priority),
            countdown=countdown,
            retry=False,
        )
    except Exception:  # any publish failure is safe: the message stays accepted in the database
        logger.warning("could not enqueue message %s; the sweeper will", message_id, exc_info=True)
        return False
    return True


def messages_publish(*, messages: Iterable[tuple[Any, str, str]], alone: Collection[Any] = ()) -> int:
    """Publish triggers for many accepted messages, given as (id, channel, priority).

    Bulk messages go as one batch task per BULK_BATCH_SIZE messages per channel (one task moves
    many messages: the per-task cost of Celery is what bounds a campaign otherwise): a fair task
    that claims the channel's next batch, shared between clients, when it runs (messaging.fair),
    or, where the channel does not share fairly, a task with the ids. The others get one task
    each, as message_publish, and so do the ids in `alone` whatever their priority: a bulk
    message a fair batch would not take (an ordering key, a look-up; the sweeper says which).
    Failures are logged, not raised (the sweeper publishes later). Returns how many tasks were
    published.
    """
    size = messaging_setting("BULK_BATCH_SIZE")
    bulk: dict[str, list[str]] = {}
    published = 0
    for message_id, channel, priority in messages:
        if priority == Priority.BULK and message_id not in alone:
            bulk.setdefault(channel, []).append(str(message_id))
        else:
            published += message_publish(message_id=message_id, channel=channel, priority=priority)
    for channel, ids in bulk.items():
        fair = fair_sharing(channel)
        for start in range(0, len(ids), size):
            published += _publish_batch(channel, ids[start : start + size], fair=fair)
    return published


def _publish_batch(channel: str, message_ids: list[str], *, fair: bool) -> bool:
    try:
        current_app.send_task(
            DISPATCH_BULK_TASK if fair else DISPATCH_BATCH_TASK,
            args=[channel] if fair else [message_ids],
            headers={"published_at": time.time()},
            queue=queue_name(channel, Priority.BULK),
            retry=False,
        )
    except Exception:  # as in message_publish: the rows are committed, the sweeper publishes them
        logger.warning(
            "could not enqueue a batch of %d bulk messages; the sweeper will", len(message_ids), exc_info=True
        )
        return False
    return True


@functools.cache
def _countdowns_in_whole_seconds() -> bool:
    """On RabbitMQ quorum queues a countdown waits in the broker (Celery's native delayed delivery),
    counted in whole seconds: Celery truncates it, and one under a second raises ValueError
    (celery/app/base.py, calculate_routing_key(int(countdown))). Other brokers take any countdown."""
    with current_app.connection_for_write() as connection:  # not connected: its transport's type only
        return detect_quorum_queues(current_app, connection.transport.driver_type)[0]
