"""Celery tasks: thin triggers around the services (the database is the queue of record)."""

from __future__ import annotations

from celery import Task, shared_task

from messaging.callbacks.delivery import callbacks_deliver
from messaging.callbacks.trigger import DELIVER_TASK
from messaging.dispatch import messages_dispatch
from messaging.locks import cluster_lock
from messaging.queue_progress import queue_consumed
from messaging.receipts import APPLY_TASK, receipts_apply_pending
from messaging.silence import SILENCE_FALLBACK_TASK, message_silence_fallback
from messaging.sweeper import messages_release_due, messages_sweep


@shared_task(bind=True, name="messaging.dispatch", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch(self: Task, message_id: str) -> None:
    """Send one message (a batch of one: messaging.dispatch). An unexpected error leaves it
    `accepted`; the sweeper tries again."""
    _record_consumed(self)
    messages_dispatch(message_ids=[message_id])


@shared_task(bind=True, name="messaging.dispatch_batch", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch_batch(self: Task, message_ids: list[str]) -> None:
    """Send a batch of bulk messages through the same core; as with dispatch, an unexpected
    error leaves the unsent ones `accepted` and the sweeper publishes them again."""
    _record_consumed(self)
    messages_dispatch(message_ids=message_ids)


@shared_task(bind=True, name="messaging.dispatch_bulk", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def dispatch_bulk(self: Task, channel: str) -> None:
    """Send the channel's next batch of bulk messages, shared fairly between clients
    (messaging.fair); as with dispatch_batch, an unexpected error leaves them `accepted`."""
    _record_consumed(self)
    messages_dispatch(fair_channel=channel)


def _record_consumed(task: Task) -> None:
    """Raise the watermark of the queue this task came from (our exchange routes by the queue's
    name) to its publish time. A worker reads message headers into the request; an eager run
    (tests) keeps them under `headers`; a task published without one records nothing."""
    request = task.request
    published_at = request.get("published_at") or (request.headers or {}).get("published_at")
    queue_consumed(queue=(request.delivery_info or {}).get("routing_key"), published_at=published_at)


@shared_task(name="messaging.sweep", ignore_result=True)
def sweep() -> None:
    """Expire overdue messages and re-enqueue lost or due ones; one sweep at a time cluster-wide.

    The lock goes with its holder: a worker killed mid-sweep (with a lock that times out, one was
    found holding every sweep off for its 120 s) leaves the next tick free to sweep.
    """
    with cluster_lock("conductor:sweep") as acquired:
        if acquired:
            messages_sweep()


@shared_task(name="messaging.release_due", ignore_result=True)
def release_due() -> None:
    """Publish the scheduled messages whose send_at has come (every second, on the release queue).
    No lock: concurrent runs mark disjoint rows (messaging.sweeper.messages_release_due)."""
    messages_release_due()


@shared_task(name=APPLY_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def apply_receipts() -> None:
    """Apply stored receipts in batches until none is due. A worker killed mid-batch rolls its
    batch back; the receipts stay pending for the next trigger or the sweeper."""
    receipts_apply_pending()


@shared_task(name=DELIVER_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def deliver_callbacks() -> None:
    """Deliver due status callbacks until none is due soon (messaging.callbacks.delivery). A
    worker killed mid-delivery leaves its callbacks leased: claimed again once the lease runs
    out, by the next kick or the sweeper."""
    callbacks_deliver()


@shared_task(name=SILENCE_FALLBACK_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def silence_fallback(message_id: str, reason: str) -> None:
    """Send a claimed message's one copy through its route's next hop (messaging.silence). A task
    delivered again after its worker died finds the copy's attempt row and sends nothing."""
    message_silence_fallback(message_id=message_id, reason=reason)
