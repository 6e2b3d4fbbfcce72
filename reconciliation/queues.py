"""Queue depth read from the broker, for /metrics and the dashboard's samples."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import current_app
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from reconciliation.anomalies import floor_time
from reconciliation.models import QueueDepth

logger = logging.getLogger(__name__)

# Minute slots for the short windows, hour slots for a day or a week.
SLOT_SECONDS = (60, 3600)


def queue_names() -> list[str]:
    return [queue.name for queue in settings.CELERY_TASK_QUEUES]


def queue_depths(timeout_s: float = 2.0) -> dict[str, int]:
    """Ready tasks per queue, asked of the broker (a passive declare: nothing is created).

    Tasks a worker holds (prefetched, or waiting out a retry countdown) are not counted: they
    are in flight, not waiting. A queue the broker has never seen is empty. Raises if the broker
    does not answer within `timeout_s`.
    """
    depths: dict[str, int] = {}
    with current_app.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)
        for name in queue_names():
            # One channel per queue: on AMQP a passive declare of a missing queue closes its channel.
            channel = connection.channel()
            try:
                _, count, _ = channel.queue_declare(queue=name, passive=True)
            except connection.channel_errors:
                count = 0
            finally:
                try:
                    channel.close()
                except Exception:  # a channel the broker already closed
                    pass
            depths[name] = int(count)
    return depths


def queue_depth_sample(*, now: datetime | None = None, depths: dict[str, int] | None = None) -> dict[str, int]:
    """Record the current depths into the minute and hour slots (keeping each queue's maximum)."""
    now = now or timezone.now()
    depths = queue_depths() if depths is None else depths
    try:
        _record(now, depths)
    except IntegrityError:  # a concurrent sample created the slot first: this one adds nothing new
        _record(now, depths)
    return depths


def _record(now: datetime, depths: dict[str, int]) -> None:
    with transaction.atomic():
        for seconds in SLOT_SECONDS:
            start = floor_time(now, seconds)
            slot, created = QueueDepth.objects.select_for_update().get_or_create(
                seconds=seconds, start=start, defaults={"depths": depths, "samples": 1, "updated_at": now}
            )
            if created:
                continue
            slot.depths = {name: max(depth, slot.depths.get(name, 0)) for name, depth in depths.items()}
            slot.samples += 1
            slot.updated_at = now
            slot.save(update_fields=["depths", "samples", "updated_at"])


def queue_depth_purge(*, now: datetime | None = None, older_than_s: float) -> int:
    now = now or timezone.now()
    deleted, _ = QueueDepth.objects.filter(start__lt=now - timedelta(seconds=older_than_s)).delete()
    return deleted
