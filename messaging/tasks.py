"""Celery tasks: thin triggers around the services (the database is the queue of record)."""

from __future__ import annotations

from celery import Task, shared_task

from messaging.bulk import messages_dispatch_batch
from messaging.dispatch import message_dispatch
from messaging.locks import cluster_lock
from messaging.queue_progress import queue_consumed
from messaging.sweeper import messages_sweep


@shared_task(bind=True, name="messaging.dispatch", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch(self: Task, message_id: str, published_at: float | None = None) -> None:
    """Send one message. An unexpected error leaves it `accepted`; the sweeper tries again."""
    queue_consumed(queue=_queue(self), published_at=published_at)
    message_dispatch(message_id=message_id)


@shared_task(bind=True, name="messaging.dispatch_batch", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch_batch(self: Task, message_ids: list[str], published_at: float | None = None) -> None:
    """Send a batch of bulk messages (messaging.bulk); as with dispatch, an unexpected error
    leaves the unsent ones `accepted` and the sweeper publishes them again."""
    queue_consumed(queue=_queue(self), published_at=published_at)
    messages_dispatch_batch(message_ids=message_ids)


def _queue(task: Task) -> str | None:
    """The queue this task came from (our exchange routes by the queue's name); None when run eagerly."""
    return (task.request.delivery_info or {}).get("routing_key")


@shared_task(name="messaging.sweep", ignore_result=True)
def sweep() -> None:
    """Expire overdue messages and re-enqueue lost or due ones; one sweep at a time cluster-wide.

    The lock goes with its holder: a worker killed mid-sweep (with a lock that times out, one was
    found holding every sweep off for its 120 s) leaves the next tick free to sweep.
    """
    with cluster_lock("conductor:sweep") as acquired:
        if acquired:
            messages_sweep()
