"""Nightly reconciliation: a day's sends against our receipts and the providers' own status.

Every message sent in the window with a final receipt is consistent as it stands; every other
one is looked up at its provider, and what the provider knows that we do not (a receipt that
never arrived) is applied through the transition service as a polled receipt. Receipts that
named no message are matched again. The run's report is stored. One run at a time
(a PostgreSQL advisory lock); a run can be repeated: what it applied is not applied twice.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta

from django.utils import timezone

from messaging.locks import cluster_lock
from messaging.models import Message, Receipt, UnmatchedReason
from messaging.receipts import receipts_rematch
from messaging.states import MessageState
from reconciliation.conf import reconciliation_setting
from reconciliation.models import ReconciliationRun, RunStatus
from reconciliation.polling import provider_status, receipt_from_status, receipt_providers

logger = logging.getLogger(__name__)

LOCK_NAME = "conductor:reconciliation"
FINAL_RECEIPT_STATES = (MessageState.DELIVERED, MessageState.READ, MessageState.UNDELIVERED, MessageState.FAILED)
# How far along a provider's verdict is; a verdict behind ours is a conflict, never applied.
PROGRESS = {
    MessageState.DISPATCHED: 1,
    MessageState.DELIVERED: 2,
    MessageState.UNDELIVERED: 2,
    MessageState.FAILED: 2,
    MessageState.READ: 3,
}


class Mismatch:
    """Kinds of disagreement counted in a run's report."""

    MISSING_RECEIPT = "missing_receipt"  # the provider has a final status we never received
    STATE_CONFLICT = "state_conflict"  # the provider says otherwise than our final state
    LOOKUP_FAILED = "lookup_failed"  # the provider could not be asked (counted as still unknown too)


def day_window(day: date) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def reconciliation_run(
    *,
    day: date,
    trigger: str,
    progress: Callable[[int], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ReconciliationRun | None:
    """Reconcile the messages dispatched on `day` (UTC); None when another run holds the lock.

    `on_start(total)` learns how many messages will be checked, `progress(n)` is called as they are.
    """
    with cluster_lock(LOCK_NAME) as acquired:
        if not acquired:
            logger.info("reconciliation of %s not started: another run is in progress", day)
            return None
        start, end = day_window(day)
        run = ReconciliationRun.objects.create(
            window_start=start, window_end=end, trigger=trigger[:32], started_at=timezone.now()
        )
        began = time.monotonic()
        try:
            _reconcile(run, progress, on_start)
        except Exception as exc:
            run.status, run.error = RunStatus.FAILED, f"{type(exc).__name__}: {exc}"[:2000]
            _finish(run, began)
            raise
        run.status = RunStatus.COMPLETED
        _finish(run, began)
        logger.info(
            "reconciliation of %s: %d checked, %d looked up, %d updated, %d still unknown, mismatches %s, "
            "%d unmatched receipts (%d matched now), %d ms",
            day,
            run.checked,
            run.looked_up,
            run.updated,
            run.still_unknown,
            run.mismatches or "none",
            run.unmatched_receipts,
            run.rematched_receipts,
            run.duration_ms,
        )
        return run


def _finish(run: ReconciliationRun, began: float) -> None:
    run.finished_at = timezone.now()
    run.duration_ms = int((time.monotonic() - began) * 1000)
    run.save()


def reconcilable_messages(start: datetime, end: datetime):
    """Dispatched in the window and still standing on that dispatch (not since replayed or given up)."""
    return Message.objects.filter(
        dispatched_at__gte=start,
        dispatched_at__lt=end,
        provider__in=receipt_providers(),
        state__in=(MessageState.DISPATCHED, *FINAL_RECEIPT_STATES),
    ).exclude(provider_message_id="")


def _reconcile(run: ReconciliationRun, progress, on_start) -> None:
    mismatches: Counter = Counter()
    candidates = reconcilable_messages(run.window_start, run.window_end)
    ids = list(candidates.order_by("dispatched_at", "pk").values_list("pk", flat=True))
    if on_start is not None:
        on_start(len(ids))
    batch = reconciliation_setting("RECONCILE_BATCH_SIZE")
    for offset in range(0, len(ids), batch):
        chunk = list(Message.objects.filter(pk__in=ids[offset : offset + batch]).order_by("dispatched_at", "pk"))
        with_final_receipt = set(
            Receipt.objects.filter(message__in=chunk, mapped_state__in=FINAL_RECEIPT_STATES).values_list(
                "message_id", flat=True
            )
        )
        for message in chunk:
            run.checked += 1
            if message.state in FINAL_RECEIPT_STATES and message.pk in with_final_receipt:
                continue  # our state stands on the provider's own word
            run.looked_up += 1
            _check_at_provider(run, message, mismatches)
        if progress is not None:
            progress(len(chunk))
        # Keep the report current, so the admin shows a long run's progress.
        ReconciliationRun.objects.filter(pk=run.pk).update(
            checked=run.checked, looked_up=run.looked_up, updated=run.updated, still_unknown=run.still_unknown
        )
    run.mismatches = dict(mismatches)
    run.unmatched_receipts, run.rematched_receipts = _rematch_receipts(run.window_start, run.window_end)


def _check_at_provider(run: ReconciliationRun, message: Message, mismatches: Counter) -> None:
    """One look-up: apply what the provider knows ahead of us, count what contradicts us."""
    status = provider_status(message)
    ahead = status is not None and PROGRESS.get(status.state, 0) > PROGRESS.get(message.state, 0)
    if ahead and receipt_from_status(message=message, status=status):  # e.g. delivered, or read after delivered
        run.updated += 1
        mismatches[Mismatch.MISSING_RECEIPT] += 1
    elif status is None:
        mismatches[Mismatch.LOOKUP_FAILED] += 1
        run.still_unknown += message.state == MessageState.DISPATCHED
    elif message.state == MessageState.DISPATCHED:
        run.still_unknown += 1
    elif status.state not in (None, message.state) and not ahead:
        mismatches[Mismatch.STATE_CONFLICT] += 1
        logger.warning(
            "reconciliation: message %s is %s but %s says %s", message.pk, message.state, message.provider, status.state
        )


def _rematch_receipts(start: datetime, end: datetime) -> tuple[int, int]:
    """Receipts received in the window that named no message: match them now if we can."""
    unmatched = list(
        Receipt.objects.filter(
            unmatched_reason=UnmatchedReason.NO_MESSAGE, received_at__gte=start, received_at__lt=end
        ).values_list("pk", flat=True)
    )
    batch = reconciliation_setting("RECONCILE_BATCH_SIZE")
    rematched = sum(
        receipts_rematch(receipt_ids=unmatched[offset : offset + batch]) for offset in range(0, len(unmatched), batch)
    )
    return len(unmatched), rematched
