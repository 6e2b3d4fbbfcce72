"""Retention: dead letters older than their priority's and category's retention, and delivered
status callbacks older than CALLBACK_RETENTION_SECONDS, are deleted.

The retention is read from the retry policies at run time (a changed setting applies to dead
letters already parked) and rows go in small batches, each its own statement, so the job never
holds locks on the table for long. The message rows stay: only the parked context is removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef, Q, QuerySet
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.models import Callback, CallbackState, DeadLetter
from messaging.routing import Priority, retry_policy_for
from reconciliation.conf import reconciliation_setting

logger = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    # (priority, category or "*" for every category without its own retention) -> rows
    removed: dict[tuple[str, str], int] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.removed.values())


def retention_groups(*, now: datetime) -> list[tuple[str, str, datetime, QuerySet[DeadLetter]]]:
    """(priority, category label, cutoff, expired rows) for every retention that applies now."""
    own_retention = sorted(
        category
        for category, overrides in messaging_setting("CATEGORY_POLICIES").items()
        if "dlq_retention_seconds" in overrides
    )
    groups = []
    for priority in Priority.values:
        cutoff = now - timedelta(seconds=retry_policy_for(priority).dlq_retention_seconds)
        rows = DeadLetter.objects.filter(priority=priority, created_at__lt=cutoff).exclude(category__in=own_retention)
        groups.append((priority, "*", cutoff, rows))
        for category in own_retention:
            cutoff = now - timedelta(seconds=retry_policy_for(priority, category).dlq_retention_seconds)
            rows = DeadLetter.objects.filter(priority=priority, category=category, created_at__lt=cutoff)
            groups.append((priority, category, cutoff, rows))
    return groups


def dead_letters_purge_expired(
    *, now: datetime | None = None, batch_size: int | None = None, dry_run: bool = False
) -> PurgeReport:
    """Delete (or, dry, count) every dead letter past its retention; `now` is injectable for tests."""
    now = now or timezone.now()
    batch_size = batch_size or reconciliation_setting("DLQ_PURGE_BATCH_SIZE")
    report = PurgeReport(dry_run=dry_run)
    for priority, category, _cutoff, rows in retention_groups(now=now):
        removed = rows.count() if dry_run else _delete_in_batches(rows, batch_size)
        if removed:
            report.removed[(priority, category)] = removed
    if report.total and not dry_run:
        logger.info(
            "dead letter retention: removed %d (%s)",
            report.total,
            ", ".join(f"{p}/{c}: {n}" for (p, c), n in sorted(report.removed.items())),
        )
    return report


def _delete_in_batches(rows: QuerySet[DeadLetter], batch_size: int) -> int:
    removed = 0
    while True:
        ids = list(rows.order_by("pk").values_list("pk", flat=True)[:batch_size])
        if not ids:
            return removed
        # Nothing references a dead letter, so this is one DELETE … WHERE id IN (…) per batch.
        deleted, _ = DeadLetter.objects.filter(pk__in=ids).delete()
        removed += deleted


def callbacks_purge_expired(
    *, now: datetime | None = None, batch_size: int | None = None, dry_run: bool = False
) -> int:
    """Delete (or, dry, count) the callbacks written before the retention that are done with:
    delivered or given up on, with no dead letter left that shows them. Three or four a message, each
    with its payload and attempt log, would soon outweigh the messages. Pending ones are still owed."""
    now = now or timezone.now()
    batch_size = batch_size or reconciliation_setting("DLQ_PURGE_BATCH_SIZE")
    cutoff = now - timedelta(seconds=reconciliation_setting("CALLBACK_RETENTION_SECONDS"))
    old = _callbacks_done_with(Callback.objects.filter(created_at__lt=cutoff))
    if dry_run:
        return old.count()
    removed = 0
    after = None  # (created_at, id) of the last row seen: old pending rows are passed once, not re-read
    while True:
        page = old.order_by("created_at", "pk")
        if after is not None:
            page = page.filter(Q(created_at__gt=after[0]) | Q(created_at=after[0], pk__gt=after[1]))
        rows = list(page.values_list("created_at", "pk")[:batch_size])
        if not rows:
            break
        deleted, _ = _callbacks_done_with(Callback.objects.filter(pk__in=[pk for _, pk in rows])).delete()
        removed += deleted
        after = rows[-1]
    if removed:
        logger.info("callback retention: removed %d callbacks written before %s", removed, cutoff.isoformat())
    return removed


def _callbacks_done_with(rows: QuerySet[Callback]) -> QuerySet[Callback]:
    """Delivered or given up on, and no dead letter left that shows them (its retention decides)."""
    parked = DeadLetter.objects.filter(callback=OuterRef("pk"))
    return rows.filter(state__in=[CallbackState.DELIVERED, CallbackState.DEAD_LETTERED]).exclude(Exists(parked))
