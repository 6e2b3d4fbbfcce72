"""The safety net: expire what passed its deadline, enqueue what is due or whose task was lost."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import connection, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q
from django.utils import timezone

from messaging.callbacks.trigger import callbacks_sweep
from messaging.conf import messaging_setting
from messaging.models import ErrorType, EventSource, Message, MessageQuerySet, unleased
from messaging.publish import messages_publish
from messaging.queue_progress import MOVING_SECONDS, SLACK_SECONDS, queues_consumed
from messaging.quiet_hours import DEADLINE_IN_QUIET_HOURS
from messaging.receipts import receipts_sweep
from messaging.routing import Channel, Priority, queue_name
from messaging.rows import rows_update_in_key_order
from messaging.services import message_transition
from messaging.silence import messages_silence_sweep
from messaging.states import MessageState

logger = logging.getLogger(__name__)


@dataclass
class SweepReport:
    expired: int = 0
    enqueued: int = 0
    receipts_triggered: bool = False
    callbacks_triggered: bool = False
    silence_fallbacks: int = 0


def messages_sweep(*, now: datetime | None = None) -> SweepReport:
    """Run once per beat tick. Idempotent: re-enqueueing a message that is queued already is
    harmless because only one task can claim it."""
    now = now or timezone.now()
    report = SweepReport()
    batch = messaging_setting("SWEEP_BATCH_SIZE")
    report.expired = _expire_overdue(now, batch)
    for priority, stale_seconds in messaging_setting("SWEEP_STALE_AFTER_SECONDS").items():
        report.enqueued += _enqueue_due(now, priority, timedelta(seconds=stale_seconds), batch)
    report.receipts_triggered = receipts_sweep(now=now)
    report.callbacks_triggered = callbacks_sweep(now=now)
    # Opted-in messages silent for too long: claimed and their one copy published (messaging.silence).
    report.silence_fallbacks = messages_silence_sweep(now=now)
    if report.expired or report.enqueued or report.receipts_triggered or report.callbacks_triggered:
        logger.info(
            "sweep: %d expired, %d enqueued%s%s",
            report.expired,
            report.enqueued,
            ", receipt applier published" if report.receipts_triggered else "",
            ", callback deliverer published" if report.callbacks_triggered else "",
        )
    return report


def _expire_overdue(now: datetime, batch: int) -> int:
    # Ordered by the deadline so that the read stops at `now` in message_accepted_expiry. Before
    # autovacuum has analyzed a campaign's new rows the planner takes any index on accepted rows as
    # returning one, and sorts all it reads (seen: 3,000 rows a sweep); without sorts, only the
    # index that gives the order is left (as in messaging.fair).
    overdue = Message.objects.filter(state=MessageState.ACCEPTED, expires_at__lte=now).unleased(now)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_sort = off")
        overdue_rows = list(overdue.order_by("expires_at").values_list("pk", "last_error_message")[:batch])
        cursor.execute("SET LOCAL enable_sort = on")  # inside an outer transaction, the rest as before
    expired = 0
    for message_id, note in overdue_rows:
        # A message that waited for its recipient's quiet hours to end (messaging.quiet_hours) says so.
        in_quiet_hours = note.startswith(DEADLINE_IN_QUIET_HOURS)
        expired += message_transition(
            message_id=message_id,
            to_state=MessageState.EXPIRED,
            source=EventSource.SWEEPER,
            detail=f"deadline passed in quiet hours before dispatch: {note}"
            if in_quiet_hours
            else "deadline passed before dispatch",
            fields={"next_attempt_at": None, "enqueued_at": None, "last_error_type": ErrorType.EXPIRED},
            extra_filter=unleased(now),
        )
    return expired


def _alone() -> ExpressionWrapper:
    """Messages that go by a task of their own, never in a fair bulk batch (messaging.fair): an
    ordering key (it may wait for an earlier message), an outcome to look up at the provider
    first, a worker-loss budget spent (messaging.dispatch settles these alone)."""
    return ExpressionWrapper(
        Q(sequence__isnull=False)
        | Q(needs_provider_lookup=True)
        | Q(worker_loss_count__gte=messaging_setting("MAX_WORKER_LOSSES")),
        output_field=BooleanField(),
    )


def _candidates(now: datetime, priority: str) -> MessageQuerySet:
    return (
        Message.objects.filter(state=MessageState.ACCEPTED, priority=priority)
        .unleased(now)
        # A message waiting for an earlier one with its ordering key is released by that one's
        # move; published here only if that one moved and the release was lost (or to look again
        # at a dead or not-yet-delivered predecessor, once per stale period).
        .filter(Q(waiting_for__isnull=True) | ~Q(waiting_for__state=MessageState.ACCEPTED))
    )


def messages_release_due(*, now: datetime | None = None) -> int:
    """Publish the messages that were stored without a task until a later time (a scheduled send,
    messaging.ingest.waits_at_acceptance) and whose time has come: the sweeper's second read
    alone, run every RELEASE_INTERVAL_SECONDS (1 s) on a queue of its own so that a scheduled
    message goes within about a second of its time, not a sweep period later behind long
    maintenance jobs (docs/scheduling.md). A range of message_accepted_enqueued per priority;
    nothing due costs one index descent per priority. Returns how many were published."""
    now = now or timezone.now()
    batch = messaging_setting("SWEEP_BATCH_SIZE")
    released = 0
    for priority in Priority.values:
        candidates = _candidates(now, priority)
        read = candidates.filter(enqueued_at__isnull=True, next_attempt_at__lte=now).order_by("next_attempt_at")
        rows = list(read.values_list("pk", "channel", _alone())[:batch])
        if not rows:
            continue
        ids = [pk for pk, _, _ in rows]
        # Marked first, as the sweeper does; a row the sweeper (or a claim) took meanwhile is not
        # marked again, and is not published twice by this job.
        marked = candidates.due(now).filter(pk__any=ids, enqueued_at__isnull=True)
        with transaction.atomic():
            ids = set(marked.select_for_update(of=("self",)).order_by("pk").values_list("pk", flat=True))
            if not ids:
                continue
            Message.objects.filter(pk__any=list(ids)).update(enqueued_at=now)
        rows = [row for row in rows if row[0] in ids]
        wanted = _tasks_for(rows, priority)
        published = messages_publish(
            messages=[(pk, channel, priority) for pk, channel, _ in rows], alone={pk for pk, _, alone in rows if alone}
        )
        if published < wanted:
            # The broker refused (Redis restarting): unmarked, the next tick (a second later) tries
            # again, rather than the sweeper a stale period (a minute) later. A task that did go
            # makes a second one harmless: only one claim takes a message.
            Message.objects.filter(
                pk__any=list(ids), state=MessageState.ACCEPTED, enqueued_at=now, lease_expires_at__isnull=True
            ).update(enqueued_at=None)
            continue
        released += len(rows)
    if released:
        logger.info("release: %d scheduled messages published", released)
    return released


def _tasks_for(rows: list[tuple[str, str, bool]], priority: str) -> int:
    """How many tasks messages_publish sends for these rows (bulk ones go BULK_BATCH_SIZE a task)."""
    if priority != Priority.BULK:
        return len(rows)
    size = messaging_setting("BULK_BATCH_SIZE")
    per_channel: dict[str, int] = {}
    for _, channel, alone in rows:
        if not alone:
            per_channel[channel] = per_channel.get(channel, 0) + 1
    return sum(1 for _, _, alone in rows if alone) + sum(-(-count // size) for count in per_channel.values())


def _enqueue_due(now: datetime, priority: str, stale_after: timedelta, batch: int) -> int:
    """Accepted, not being sent, due, and with no task published recently (or none at all)."""
    candidates = _candidates(now, priority)
    # Three reads, each a range of an index (message_accepted_enqueued), so that a campaign's
    # backlog, queued moments ago and so neither unpublished nor stale, costs nothing here: no
    # task yet and due now, no task and a retry time that has come, or a task published too long
    # ago. One read with ORs would scan every accepted row (tests/messaging/test_sweeper.py).
    never_published = candidates.filter(enqueued_at__isnull=True)
    reads = (
        never_published.filter(next_attempt_at__isnull=True).order_by("created_at"),
        never_published.filter(next_attempt_at__lte=now).order_by("next_attempt_at"),
        candidates.due(now).filter(enqueued_at__lt=_stale_before(now, priority, stale_after)).order_by("enqueued_at"),
    )
    rows: list[tuple[str, str, bool]] = []
    for read in reads:
        if len(rows) < batch:
            rows += read.values_list("pk", "channel", _alone())[: batch - len(rows)]
    if not rows:
        return 0
    # Mark first, then publish: a crash in between leaves them for the next sweep, not lost. A
    # message claimed in between is not marked; its task is published anyway and claims nothing.
    marked = candidates.due(now).filter(Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=now - stale_after))
    rows_update_in_key_order(marked.filter(pk__any=[pk for pk, _, _ in rows]), enqueued_at=now)
    # A bulk message that a fair batch would not take (messaging.fair) gets a task of its own.
    messages_publish(
        messages=[(pk, channel, priority) for pk, channel, _ in rows], alone={pk for pk, _, alone in rows if alone}
    )
    return len(rows)


def _stale_before(now: datetime, priority: str, stale_after: timedelta) -> datetime:
    """A task published before this is taken as lost: the stale time ago, or, while the priority's
    queues are draining a backlog older than that, where their workers have got to (a task
    published after the last one they started is most likely still queued; messaging.queue_progress)."""
    cutoff = now - stale_after
    consumed = queues_consumed(
        [queue_name(channel, priority) for channel in Channel.values],
        now=now.timestamp(),
        moving_within=min(stale_after.total_seconds(), MOVING_SECONDS),
    )
    if consumed:
        cutoff = min(cutoff, datetime.fromtimestamp(max(consumed.values()) - SLACK_SECONDS, tz=UTC))
    return cutoff
