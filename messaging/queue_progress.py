"""How far each queue's workers have got: the sweeper's way to tell a queued task from a lost one.

The broker cannot be asked whether a message's task is still queued. The sweeper's rule was time
alone: enqueued longer ago than the priority's stale time means lost, publish again. A backlog
that takes longer than that to drain (200,000 bulk messages on a slow machine: 1,075 s against
bulk's 600 s) was then published a second time while its first tasks were still queued; each copy
costs a claim, and copies run beside the originals.

Queues are first in, first out. Each task carries the time it was published, and the worker that
starts it raises its queue's watermark to that time. While the watermark keeps moving, a task
published after it is most likely still queued: the sweeper republishes only what was enqueued
before the watermark of the priority's leading queue (less a few seconds of slack), and never
what the time rule would not. When the watermark stops moving for MOVING_SECONDS (workers gone, the
broker emptied), the time rule applies alone again: after a broker loss, lost tasks are
republished at most that much later than before.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable

from kombu.transport.native_delayed_delivery import MAX_NUMBER_OF_BITS_TO_USE

from providers.redis_state import STATE_ERRORS, shared_redis

logger = logging.getLogger(__name__)

KEY = "conductor:queue:consumed"
# Publishers' clocks and concurrent consumers make the watermark a little uneven: a task
# published this long before it is still taken as possibly queued.
SLACK_SECONDS = 5.0
# A queue whose workers started none of its tasks for this long is not draining.
MOVING_SECONDS = 30.0

# On RabbitMQ a countdown task travels through Celery's delay exchanges with its delay in binary
# ahead of the queue's routing key ("0.1.…1.sms.critical", one bit a word): what follows is the queue.
_DELAY_PREFIX = re.compile(rf"^(?:[01]\.){{{MAX_NUMBER_OF_BITS_TO_USE}}}")

# Raise the queue's watermark to `published`, and stamp when it last moved; one round trip.
_RAISE = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if current == nil or current < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], ARGV[1] .. ':moved', ARGV[3])
end
return 1
"""


def queue_consumed(*, queue: str | None, published_at: float | None) -> None:
    """A worker starts a task published at `published_at` (epoch seconds) from `queue` (the
    routing key it was delivered with: our exchange routes by queue name).

    Best effort: the rule falls back to time alone when the watermark is missing, so a Redis
    error here never stands in a send's way.
    """
    if not queue or published_at is None:
        return
    queue = _DELAY_PREFIX.sub("", queue, count=1)
    try:
        shared_redis().register_script(_RAISE)(keys=[KEY], args=[queue, repr(float(published_at)), repr(time.time())])
    except STATE_ERRORS:
        logger.debug("queue watermark not recorded for %s", queue, exc_info=True)


def queues_consumed(queues: Iterable[str], *, now: float, moving_within: float) -> dict[str, float]:
    """{queue: watermark} for the queues whose watermark moved within `moving_within` seconds."""
    queues = list(queues)
    fields = [name for queue in queues for name in (queue, f"{queue}:moved")]
    try:
        values = shared_redis().hmget(KEY, fields)
    except STATE_ERRORS:
        logger.debug("queue watermarks unavailable (Redis unreachable): stale by time alone")
        return {}
    marks = {}
    for index, queue in enumerate(queues):
        mark, moved = values[2 * index], values[2 * index + 1]
        if mark is not None and moved is not None and float(moved) >= now - moving_within:
            marks[queue] = float(mark)
    return marks
