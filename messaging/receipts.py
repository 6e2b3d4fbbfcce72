"""Provider receipts: stored as they come (webhook, anymail's tracking signal, polling), applied
to messages later in batches, off the request path.

A webhook answers as soon as its receipt is stored (one INSERT): a campaign's receipts come in
thousands a second and the provider gives up on a receiver that is slow. The batch then takes
the pending rows (FOR UPDATE SKIP LOCKED, so several appliers never take one twice), matches
each to a send of ours, ranks each message's receipts so that out-of-order ones still only move
it forward, and applies them with a few statements per batch in the transaction that marks them
processed. A batch killed half-way rolls back whole: its receipts are still pending, and the
next trigger or the sweeper applies them.

A receipt changes a message only if that message was handed to that provider (an attempt with
it, under the id the provider gave where it gave one): anything else is kept as unmatched,
counted, and changes nothing. A receipt for a message we have not yet recorded as dispatched
(receipts overtake our own write) waits for that write, up to RECEIPT_HOLD_SECONDS.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from anymail.signals import AnymailTrackingEvent, tracking
from celery import current_app
from django.db import IntegrityError, connection, transaction
from django.dispatch import receiver
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.models import (
    AttemptOutcome,
    DispatchAttempt,
    ErrorType,
    EventSource,
    Message,
    MessageEvent,
    Receipt,
    UnmatchedReason,
)
from messaging.rows import rows_insert, rows_insert_ignoring_conflicts, rows_update
from messaging.services import messages_transition
from messaging.silence import (
    REASON_UNDELIVERED,
    messages_silence_claim,
    silence_fallback_opted_in,
    silence_fallback_publish,
)
from messaging.states import MessageState
from messaging.suppressions.email_events import suppressions_from_events
from providers.mailgun import AnymailProvider
from providers.redis_state import shared_redis
from providers.registry import provider_class
from providers.types import ReceiptEvent

logger = logging.getLogger(__name__)

APPLY_TASK = "messaging.apply_receipts"
RECEIPTS_QUEUE = "receipts"
# Set while an apply task is published and not yet looking: the webhooks of a busy second
# publish one task between them, not one each.
_PUBLISHED_KEY = "conductor:receipts:apply-published"
_PUBLISHED_TTL_S = 30  # a task lost with its key set costs at most this (the sweeper looks too)
# How far along the lifecycle each receipt state is: a message's receipts are applied in this
# order whatever order they came in (a late `sent` after `delivered` then changes nothing).
RANK = {
    MessageState.DISPATCHED: 1,
    MessageState.DELIVERED: 2,
    MessageState.UNDELIVERED: 2,
    MessageState.FAILED: 2,
    MessageState.READ: 3,
}
_DEFER_MAX_S = 60.0


@dataclass
class ApplyReport:
    taken: int = 0
    applied: int = 0
    kept: int = 0  # matched, but moved nothing (a repeat, or behind the message's state)
    deferred: int = 0
    unmatched: Counter = field(default_factory=Counter)

    def add(self, other: ApplyReport) -> None:
        self.taken += other.taken
        self.applied += other.applied
        self.kept += other.kept
        self.deferred += other.deferred
        self.unmatched.update(other.unmatched)


# --- storing ------------------------------------------------------------------------------------
def _receipt_row(event: ReceiptEvent, source: str, now: datetime) -> Receipt:
    return Receipt(
        provider=event.provider,
        event_id=event.event_id,
        message_ref=_uuid_or_none(event.message_id),
        provider_message_id=event.provider_message_id,
        provider_status=event.provider_status,
        mapped_state=event.state or "",
        error_code=event.error_code,
        source=source,
        received_at=now,
        due_at=now,
        payload=event.payload,
    )


def receipts_store(*, events: list[ReceiptEvent], source: str = EventSource.WEBHOOK) -> None:
    """Store receipts to be applied (a repeat of a stored event is ignored) and trigger the
    applier once they are committed; returns once they are. Outside a transaction (a webhook),
    the receipts of the process's concurrent requests are written together (_GROUP_COMMIT)."""
    if not events:
        return
    now = timezone.now()
    rows = [_receipt_row(event, source, now) for event in events]
    if transaction.get_connection().in_atomic_block:
        _insert(rows)
        transaction.on_commit(receipts_apply_soon)
        return
    _GROUP_COMMIT.write(rows)  # the writer triggers the applier, once for everything it wrote


async def receipts_store_async(*, events: list[ReceiptEvent], source: str = EventSource.WEBHOOK) -> None:
    """receipts_store for an event loop (the receipt intake server): the rows join the process's
    next group commit and the caller's coroutine resumes once they are written, the loop free
    meanwhile. Raises what the write raised."""
    if not events:
        return
    now = timezone.now()
    rows = [_receipt_row(event, source, now) for event in events]
    loop = asyncio.get_running_loop()
    written: asyncio.Future[None] = loop.create_future()
    settler = _SETTLERS.get(loop)
    if settler is None:
        settler = _SETTLERS[loop] = _LoopSettler(loop)
    _GROUP_COMMIT.submit(rows, functools.partial(settler.settle, written))
    await written


class _LoopSettler:
    """Hands the writer thread's results to an event loop's waiting receipts, one wake-up of the
    loop per write however many receipts it carried (a wake-up each cost the writer a fifth of
    its time at campaign scale)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[None], BaseException | None]] = []

    def settle(self, written: asyncio.Future[None], error: BaseException | None) -> None:
        """From the writer thread."""
        with self._lock:
            self._ready.append((written, error))
            if len(self._ready) > 1:
                return  # a wake-up is on its way and will take this one too
        self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for written, error in ready:
            if written.done():  # the request was cancelled (client gone): nothing to tell
                continue
            if error is None:
                written.set_result(None)
            else:
                written.set_exception(error)


_SETTLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSettler] = weakref.WeakKeyDictionary()


def _insert(rows: list[Receipt]) -> None:
    # Without a transaction of its own: in autocommit one INSERT is one round trip, where
    # BEGIN, INSERT, COMMIT are three.
    rows_insert_ignoring_conflicts(Receipt, rows)


class _GroupCommit:
    """One INSERT (and one commit) for the receipts of every request thread of this process that
    came while the previous one was written: a database commit per receipt is what bounded intake.

    A writer thread of its own, with the process's one connection for receipts: request threads
    only wait for their rows to be written, so gunicorn can run many threads (each waiting request
    is one more row in the next write) without a database connection per thread. A failed write
    fails each of its requests (they answer 5xx and the provider retries) and drops the connection,
    so the next write reconnects (a restarted PostgreSQL).
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._pending: list[tuple[list[Receipt], _Written]] = []
        self._writer: threading.Thread | None = None
        self._trigger = _ApplyTrigger()

    def write(self, rows: list[Receipt]) -> None:
        """Returns once `rows` are written (raises what the write raised)."""
        written = _Written()
        with self._condition:
            self._enqueue(rows, written)
            while not written.done:
                self._condition.wait()
        written.raise_if_failed()

    def submit(self, rows: list[Receipt], on_written: Callable[[BaseException | None], None]) -> None:
        """Returns at once; the writer thread calls `on_written(error or None)` once `rows` are written."""
        with self._condition:
            self._enqueue(rows, _Written(on_written))

    def _enqueue(self, rows: list[Receipt], written: _Written) -> None:
        if self._writer is None or not self._writer.is_alive():
            # Started here, not at import: gunicorn forks its workers after importing the app.
            self._writer = threading.Thread(target=self._write_forever, name="receipt-writer", daemon=True)
            self._writer.start()
        self._pending.append((rows, written))
        self._condition.notify_all()

    def _write_forever(self) -> None:
        while True:
            with self._condition:
                while not self._pending:
                    if not self._condition.wait(timeout=_WRITER_IDLE_CLOSE_S):
                        _close_quietly()  # idle: no connection held between bursts
                batch, self._pending = self._pending, []
            error: BaseException | None = None
            try:
                _insert([row for rows, _ in batch for row in rows])
            except BaseException as exc:  # handed to every request of the batch, each answers 5xx
                error = exc
                _close_quietly()
            else:
                self._trigger.pull()
            with self._condition:
                for _, each in batch:
                    each.done, each.error = True, error
                self._condition.notify_all()
            for _, each in batch:
                if each.on_written is not None:
                    try:
                        each.on_written(error)
                    except Exception:  # e.g. its event loop closed meanwhile: the writer goes on
                        logger.exception("could not hand a receipt write's result back")


_WRITER_IDLE_CLOSE_S = 1.0


class _ApplyTrigger:
    """receipts_apply_soon() from a thread of its own, once per run of writes: the writer never
    waits on Redis between two INSERTs (a third of its time at campaign scale, counting the wait
    for the GIL after each answer). Every write pulls after its commit, and a pull always leads
    to a trigger that starts after it, so no stored receipt goes untriggered."""

    def __init__(self) -> None:
        self._pulled = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def pull(self) -> None:
        self._pulled.set()
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="receipt-trigger", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            self._pulled.wait()
            self._pulled.clear()
            receipts_apply_soon()  # logs its failures; the sweeper is the safety net


def _close_quietly() -> None:
    try:
        connection.close()
    except Exception:  # a broken connection may fail to close: it is dropped either way
        pass


class _Written:
    __slots__ = ("done", "error", "on_written")

    def __init__(self, on_written: Callable[[BaseException | None], None] | None = None) -> None:
        self.done = False
        self.error: BaseException | None = None
        self.on_written = on_written

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error


_GROUP_COMMIT = _GroupCommit()


def receipt_record(*, event: ReceiptEvent, source: str = EventSource.WEBHOOK) -> tuple[Receipt, bool]:
    """Store one receipt and apply it now (a status look-up, which waits for the answer anyway).

    Returns the receipt as applied and whether it was new; a repeat is not applied again.
    """
    try:
        with transaction.atomic():
            receipt = _receipt_row(event, source, timezone.now())
            receipt.save(force_insert=True)
    except IntegrityError:
        logger.info("duplicate %s receipt %s ignored", event.provider, event.event_id)
        return Receipt.objects.get(provider=event.provider, event_id=event.event_id), False
    receipts_apply_batch(receipt_ids=[receipt.pk])
    receipt.refresh_from_db()
    return receipt, True


def _uuid_or_none(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value) if value else None
    except ValueError:
        return None


# --- triggering ---------------------------------------------------------------------------------
def receipts_apply_soon() -> None:
    """Publish the apply task unless one is published and has not started looking yet. A
    failure is logged, not raised: the receipt is stored and the sweeper triggers the applier."""
    try:
        if not shared_redis().set(_PUBLISHED_KEY, 1, nx=True, ex=_PUBLISHED_TTL_S):
            return
    except Exception:  # Redis down: publish anyway (a task too many costs one empty query)
        logger.info("receipt trigger: Redis unavailable, publishing without coalescing")
    _publish()


def _publish() -> bool:
    try:
        current_app.send_task(APPLY_TASK, queue=RECEIPTS_QUEUE, retry=False)
    except Exception:
        logger.warning("could not publish the receipt applier; the sweeper will", exc_info=True)
        return False
    return True


def receipts_apply_pending(*, budget_s: float = 10.0) -> ApplyReport:
    """The apply task's work: batches until no receipt is due, or the budget is spent (then the
    task publishes itself again, so a worker shared with sends is not held for ever)."""
    report = ApplyReport()
    size = messaging_setting("RECEIPT_APPLY_BATCH_SIZE")
    began = time.monotonic()
    while True:
        try:
            # Before each look: a receipt committed after it publishes a new task.
            shared_redis().delete(_PUBLISHED_KEY)
        except Exception:
            pass
        batch = receipts_apply_batch(limit=size)
        report.add(batch)
        if batch.taken < size:
            return report
        if time.monotonic() - began > budget_s:
            _publish()
            return report


def receipts_due_waiting(*, now: datetime, older_than: timedelta) -> bool:
    """Whether a receipt due this long has not been applied: its trigger was lost (the sweeper asks)."""
    return Receipt.objects.filter(processed_at__isnull=True, due_at__lte=now - older_than).exists()


def receipts_sweep(*, now: datetime) -> bool:
    """The sweeper's part: publish the applier for receipts whose trigger was lost (a broker or
    Redis outage, a worker killed mid-batch). Returns whether it did."""
    if receipts_due_waiting(now=now, older_than=timedelta(seconds=messaging_setting("RECEIPT_SWEEP_AFTER_SECONDS"))):
        return _publish()
    return False


# --- applying -----------------------------------------------------------------------------------
def receipts_apply_batch(
    *, limit: int = 1000, receipt_ids: list[int] | None = None, now: datetime | None = None
) -> ApplyReport:
    """Apply up to `limit` due receipts (or the pending ones of `receipt_ids`) in one transaction."""
    now = now or timezone.now()
    report = ApplyReport()
    with transaction.atomic():
        pending = Receipt.objects.filter(processed_at__isnull=True)
        pending = pending.filter(pk__in=receipt_ids) if receipt_ids is not None else pending.filter(due_at__lte=now)
        receipts = list(
            pending.select_for_update(skip_locked=True)
            .order_by("due_at", "id")
            .only(
                "id",
                "provider",
                "message_ref",
                "provider_message_id",
                "provider_status",
                "mapped_state",
                "error_code",
                "source",
                "received_at",
                "deferrals",
            )[:limit]
        )
        report.taken = len(receipts)
        if not receipts:
            return report
        messages = _messages_named(receipts)
        sends = _sends_by_message(list(messages.values()))
        outcome: dict[int, dict[str, Any]] = {}
        by_message: dict[Any, list[Receipt]] = defaultdict(list)
        hold = timedelta(seconds=messaging_setting("RECEIPT_HOLD_SECONDS"))
        for receipt in receipts:
            message = _message_of(receipt, messages)
            reason = _unmatched_reason(receipt, message, sends)
            if reason:
                report.unmatched[str(reason)] += 1
                outcome[receipt.pk] = _processed(receipt, now, reason=reason)
            elif message["state"] == MessageState.ACCEPTED:
                if now - receipt.received_at > hold:
                    report.unmatched[str(UnmatchedReason.NEVER_DISPATCHED)] += 1
                    outcome[receipt.pk] = _processed(receipt, now, reason=UnmatchedReason.NEVER_DISPATCHED)
                else:
                    report.deferred += 1
                    outcome[receipt.pk] = _deferred(receipt, now)
            else:
                by_message[message["pk"]].append(receipt)
                outcome[receipt.pk] = _processed(receipt, now, message_id=message["pk"])
        applied, states = _apply_ranked(by_message, messages)
        _silence_fallback_undelivered(states, messages)
        for receipt_id in applied:
            outcome[receipt_id]["applied"] = True
        report.applied = len(applied)
        report.kept = sum(len(group) for group in by_message.values()) - len(applied)
        # Bounces, complaints and unsubscribes feed the client's suppression list (whether or not
        # they moved the message), once: in the transaction that marks them processed.
        suppressions_from_events(
            (pk, receipt.provider, receipt.provider_status, receipt.error_code)
            for pk, group in by_message.items()
            for receipt in group
        )
        rows_update(Receipt.objects.all(), outcome)
    if report.unmatched:
        logger.warning("receipts unmatched (changed nothing): %s", dict(report.unmatched))
    return report


def _messages_named(receipts: list[Receipt]) -> dict[Any, dict[str, Any]]:
    """The messages the receipts name, by our id and by (provider, provider's id), with the
    columns matching needs. Those past `accepted` are locked in key order (as every writer of many
    messages locks); an `accepted` one is left unlocked: its receipts only wait, and a worker is
    probably about to record it dispatched, which a lock held for the whole batch would stall."""
    refs = {receipt.message_ref for receipt in receipts if receipt.message_ref}
    by_provider: dict[str, set[str]] = defaultdict(set)
    for receipt in receipts:
        if not receipt.message_ref and receipt.provider_message_id:
            by_provider[receipt.provider].add(receipt.provider_message_id)
    columns = ("pk", "state", "provider", "provider_message_id", "category", "silence_fallback_at")
    found = list(Message.objects.filter(pk__any=list(refs)).values(*columns)) if refs else []
    for provider, provider_ids in by_provider.items():
        found += Message.objects.filter(provider=provider, provider_message_id__in=provider_ids).values(*columns)
    rows = {row["pk"]: row for row in found}
    sent = sorted(pk for pk, row in rows.items() if row["state"] != MessageState.ACCEPTED)
    if sent:
        # Read again under the lock: the state may have moved since the first read.
        rows.update(
            (row["pk"], row)
            for row in Message.objects.select_for_update().filter(pk__any=sent).order_by("pk").values(*columns)
        )
    messages: dict[Any, dict[str, Any]] = {}
    for row in rows.values():
        messages[row["pk"]] = row
        if row["provider_message_id"]:
            messages[(row["provider"], row["provider_message_id"])] = row
    return messages


def _message_of(receipt: Receipt, messages: dict[Any, dict[str, Any]]) -> dict[str, Any] | None:
    if receipt.message_ref:
        return messages.get(receipt.message_ref)
    return messages.get((receipt.provider, receipt.provider_message_id))


def _sends_by_message(messages: list[dict[str, Any]]) -> dict[Any, dict[str, set[str]]]:
    """Per message, the providers it was handed to, each with the ids they gave ("" while unknown)."""
    ids = list({row["pk"] for row in messages})
    sends: dict[Any, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    if not ids:
        return sends
    attempts = (
        DispatchAttempt.objects.filter(message_id__any=ids)
        .exclude(outcome=AttemptOutcome.SKIPPED)
        .values_list("message_id", "provider", "provider_message_id")
    )
    for message_id, provider, provider_message_id in attempts:
        sends[message_id][provider].add(provider_message_id)
    for row in messages:
        if row["provider_message_id"]:
            sends[row["pk"]][row["provider"]].add(row["provider_message_id"])
    return sends


def _unmatched_reason(
    receipt: Receipt, message: dict[str, Any] | None, sends: dict[Any, dict[str, set[str]]]
) -> str | None:
    if message is None:
        return UnmatchedReason.NO_MESSAGE
    given = sends.get(message["pk"], {}).get(receipt.provider)
    if not given:
        return UnmatchedReason.NO_ATTEMPT
    known = given - {""}
    if receipt.provider_message_id and known and receipt.provider_message_id not in known:
        return UnmatchedReason.ID_MISMATCH
    return None


def _processed(receipt: Receipt, now: datetime, *, message_id: Any = None, reason: str = "") -> dict[str, Any]:
    # The same fields as _deferred's: rows_update writes every row's in one statement.
    return {
        "processed_at": now,
        "message": message_id,
        "unmatched_reason": reason,
        "applied": False,
        "due_at": now,
        "deferrals": receipt.deferrals,
    }


def _deferred(receipt: Receipt, now: datetime) -> dict[str, Any]:
    wait = min(2.0**receipt.deferrals, _DEFER_MAX_S)
    return {
        "processed_at": None,
        "message": None,
        "unmatched_reason": "",
        "applied": False,
        "due_at": now + timedelta(seconds=wait),
        "deferrals": receipt.deferrals + 1,
    }


def _apply_ranked(
    by_message: dict[Any, list[Receipt]], messages: dict[Any, dict[str, Any]]
) -> tuple[set[int], dict[Any, str]]:
    """Apply each message's receipts in rank order, one round per receipt a message has: each
    round is one transition call per target state. A late receipt's failure is only recorded
    (_late_failures_record). Returns the ids of the receipts applied and each message's state after."""
    late_failures = [
        (pk, r)
        for pk, group in by_message.items()
        for r in group
        if r.mapped_state in _FAILURES and _late(r, messages[pk])
    ]
    _late_receipts_record(late_failures, messages, note="the message follows the copy sent since")
    left_out = {r.pk for _, r in late_failures}
    queues = {
        pk: sorted(
            (r for r in group if r.mapped_state and r.pk not in left_out),
            key=lambda r: (RANK.get(r.mapped_state, 0), r.pk),
        )
        for pk, group in by_message.items()
    }
    state = {pk: messages[pk]["state"] for pk in queues}
    applied: set[int] = set()
    late_repeats: list[tuple[Any, Receipt]] = []
    while True:
        rounds: dict[tuple[str, str, frozenset[str]], dict[Any, tuple[str, dict[str, Any]]]] = defaultdict(dict)
        chosen: dict[Any, Receipt] = {}
        for pk, queue in queues.items():
            while queue and queue[0].mapped_state == state[pk]:
                # A repeat of where the message stands (`sent` when dispatched): nothing to do, but
                # a late receipt's delivery is still shown on the timeline (the other copy's came first).
                repeat = queue.pop(0)
                if repeat.mapped_state in _FINAL_RECEIPTS and _late(repeat, messages[pk]):
                    late_repeats.append((pk, repeat))
            if not queue:
                continue
            receipt = queue.pop(0)
            fields = _fields(receipt, messages[pk])
            rounds[(receipt.mapped_state, receipt.source, frozenset(fields))][pk] = (
                _detail(receipt, messages[pk]),
                fields,
            )
            chosen[pk] = receipt
        if not rounds:
            _late_receipts_record(late_repeats, messages, note="the message is there already")
            return applied, state
        for (to_state, source, _), changes in rounds.items():
            for pk in messages_transition(to_state=to_state, source=source, changes=changes):
                state[pk] = to_state
                applied.add(chosen[pk].pk)


def _fields(receipt: Receipt, message: dict[str, Any]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if receipt.provider_message_id and (not message["provider_message_id"] or _late(receipt, message)):
        # A late receipt that is applied is a delivery (failures are not: _apply_ranked): the
        # message's reference ends as the copy that delivered.
        fields = {"provider": receipt.provider, "provider_message_id": receipt.provider_message_id}
    if receipt.mapped_state == MessageState.FAILED:
        # The provider took it, then gave up for good: the dead letter says so.
        fields |= {
            "last_error_type": _receipt_error_type(receipt),
            "last_error_code": receipt.error_code,
            "last_error_message": f"{receipt.provider} reported {receipt.provider_status} after accepting it",
        }
    return fields


def _receipt_error_type(receipt: Receipt) -> str:
    """The error type a failed receipt's code means at its provider (Twilio 63016: outside the
    WhatsApp session window), else REJECTED."""
    try:
        types = provider_class(receipt.provider).receipt_error_types
    except LookupError:  # a provider no longer known: its receipts still apply
        return ErrorType.REJECTED
    return types.get(receipt.error_code, ErrorType.REJECTED)


def _detail(receipt: Receipt, message: dict[str, Any]) -> str:
    status = f"{receipt.provider_status}" + (f" (error {receipt.error_code})" if receipt.error_code else "")
    if _late(receipt, message):
        return f"late receipt from {receipt.provider} after silence fallback: {status}"
    return f"{receipt.provider} receipt: {status}"


# --- fallback on silence (messaging.silence) ------------------------------------------------------
_FAILURES = frozenset({MessageState.UNDELIVERED, MessageState.FAILED})
_FINAL_RECEIPTS = _FAILURES | {MessageState.DELIVERED, MessageState.READ}


def _late(receipt: Receipt, message: dict[str, Any]) -> bool:
    """A receipt for the first copy of a message whose fallback on silence sent another, which the
    message's reference now names: a late receipt."""
    if message["silence_fallback_at"] is None:
        return False
    if receipt.provider_message_id:
        return (receipt.provider, receipt.provider_message_id) != (message["provider"], message["provider_message_id"])
    return receipt.provider != message["provider"]


def _late_receipts_record(late: list[tuple[Any, Receipt]], messages: dict[Any, dict[str, Any]], *, note: str) -> None:
    """Late receipts that change nothing, on the message's timeline: an undelivered or failed one is
    never applied (the copy sent since decides; a delivery of either copy is applied, the recipient
    has it), a delivery after the other copy's is a repeat."""
    if not late:
        return
    rows_insert(
        MessageEvent,
        [
            MessageEvent(
                message_id=pk,
                created_at=timezone.now(),
                source=receipt.source,
                from_state=messages[pk]["state"],
                to_state=receipt.mapped_state,
                applied=False,
                detail=f"{_detail(receipt, messages[pk])} (not applied: {note})",
            )
            for pk, receipt in late
        ],
    )
    for pk, receipt in late:
        logger.info("message %s: late %s receipt %s kept, not applied", pk, receipt.provider, receipt.provider_status)


def _silence_fallback_undelivered(states: dict[Any, str], messages: dict[Any, dict[str, Any]]) -> None:
    """Messages of an opted-in category this batch moved to undelivered, never fallen back before:
    claimed in this transaction, their copy published once it commits (messaging.silence)."""
    wanted = [
        pk
        for pk, state in states.items()
        if state == MessageState.UNDELIVERED
        and messages[pk]["state"] != MessageState.UNDELIVERED
        and messages[pk]["silence_fallback_at"] is None
        and silence_fallback_opted_in(messages[pk]["category"])
    ]
    for claim in messages_silence_claim(
        message_ids=wanted, reason=REASON_UNDELIVERED, states=(MessageState.UNDELIVERED,)
    ):
        transaction.on_commit(lambda claim=claim: silence_fallback_publish(claim))


def receipts_rematch(*, receipt_ids: list[int]) -> int:
    """Look again at receipts that matched no message (reconciliation: its send may have been
    recorded since); returns how many now matched one."""
    Receipt.objects.filter(pk__in=receipt_ids, unmatched_reason=UnmatchedReason.NO_MESSAGE).update(
        processed_at=None, unmatched_reason="", due_at=timezone.now()
    )
    report = receipts_apply_batch(receipt_ids=receipt_ids, limit=len(receipt_ids) or 1)
    return report.taken - sum(report.unmatched.values()) - report.deferred


@receiver(tracking, dispatch_uid="messaging.receipts.record_tracking_event")
def record_tracking_event(sender: type, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """anymail's tracking webhooks (signature already checked by anymail) -> stored receipts."""
    provider = AnymailProvider.for_esp(esp_name)
    if provider is None:
        logger.warning("tracking event from %s ignored: no Conductor provider for that ESP", esp_name)
        return
    receipts_store(events=[provider.receipt_event(event)])
