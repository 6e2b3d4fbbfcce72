"""Celery tasks: thin triggers around the services (the database is the queue of record)."""

from __future__ import annotations

import logging

import redis
from celery import shared_task
from django.conf import settings

from messaging.bulk import messages_dispatch_batch
from messaging.dispatch import message_dispatch
from messaging.sweeper import messages_sweep

logger = logging.getLogger(__name__)


@shared_task(name="messaging.dispatch", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch(message_id: str) -> None:
    """Send one message. An unexpected error leaves it `accepted`; the sweeper tries again."""
    message_dispatch(message_id=message_id)


@shared_task(name="messaging.dispatch_batch", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch_batch(message_ids: list[str]) -> None:
    """Send a batch of bulk messages (messaging.bulk); as with dispatch, an unexpected error
    leaves the unsent ones `accepted` and the sweeper publishes them again."""
    messages_dispatch_batch(message_ids=message_ids)


@shared_task(name="messaging.sweep", ignore_result=True)
def sweep() -> None:
    """Expire overdue messages and re-enqueue lost or due ones; one sweep at a time cluster-wide."""
    try:
        lock = redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2).lock(
            "conductor:lock:sweep", timeout=120, blocking=False
        )
        acquired = lock.acquire()
    except redis.RedisError:
        # Fail open: overlapping sweeps only publish duplicate triggers, which claims absorb.
        logger.warning("sweep lock unavailable (Redis unreachable); sweeping without it")
        messages_sweep()
        return
    if not acquired:
        return
    try:
        messages_sweep()
    finally:
        try:
            lock.release()
        except redis.RedisError:
            pass
