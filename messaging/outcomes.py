"""Recording what a dispatch attempt came to: accepted, retry later, failed, dead-lettered.

Every final write of a claimed message also releases its lease; nothing here calls a provider.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from messaging.callbacks.outbox import callbacks_attempt_failed
from messaging.conf import messaging_setting
from messaging.logging import masked, scrubbed
from messaging.metrics import attempt_count, latency_observe
from messaging.models import AttemptOutcome, DispatchAttempt, EventSource, Message
from messaging.publish import message_publish
from messaging.routing import Hop, backoff_delay, retry_policy_for
from messaging.rows import rows_insert, rows_update_in_key_order
from messaging.services import message_transition
from messaging.states import MessageState
from providers.types import ProviderError, SendResult

logger = logging.getLogger(__name__)

# Fields every final write of a claimed message clears: the lease and any scheduled retry.
RELEASE = {"lease_expires_at": None, "next_attempt_at": None, "enqueued_at": None}


def attempts_start(
    *,
    starts: list[tuple[Message, Hop, str]],
    outcome: str = AttemptOutcome.IN_PROGRESS,
    generation: int | None = None,
    counters: bool = True,
) -> list[DispatchAttempt]:
    """Record hops (message, hop, note) before their network calls, so a worker that dies
    mid-call leaves a trace; the one writer of attempt rows, for one message or a batch.

    Each message's attempt counter (and, for a call, the provider to ask if its outcome is lost)
    is counted up in memory and, unless `counters` is False (the claim writes them with the
    lease), in the database. A look-up is recorded under the generation it asks about
    (`generation`), which after a replay is the one given up on, so a failed look-up is retried
    for that same send. A hop recorded as already decided (a skip) has no call to wait for.
    """
    now = timezone.now()
    calling = outcome == AttemptOutcome.IN_PROGRESS
    attempts = []
    for message, hop, note in starts:
        message.attempt_count += 1
        if calling:
            message.provider = hop.provider
        attempts.append(
            DispatchAttempt(
                message=message,
                number=message.attempt_count,
                send_generation=message.send_generation if generation is None else generation,
                provider=hop.provider,
                channel=hop.channel,
                note=note[:200],
                started_at=now,
                ended_at=None if calling else now,
                outcome=outcome,
            )
        )
    rows_insert(DispatchAttempt, attempts, new_keys=True)
    if counters:
        by_provider: dict[str, list[Any]] = {}
        for message, hop, _ in starts:
            by_provider.setdefault(hop.provider if calling else "", []).append(message.pk)
        for provider, ids in by_provider.items():
            fields: dict[str, Any] = {"attempt_count": F("attempt_count") + 1}
            if provider:
                fields["provider"] = provider
            if len(ids) == 1:
                Message.objects.filter(pk=ids[0]).update(**fields)
            else:  # many rows: locked in key order, as every multi-row write
                rows_update_in_key_order(Message.objects.filter(pk__any=ids), **fields)
    return attempts


def attempt_finish(
    *, attempt: DispatchAttempt, started: float, outcome: str, ended: float | None = None, **fields: Any
) -> None:
    """Record how a provider call ended (`ended`: when, if not now): its row, one log line and
    the attempt metrics."""
    latency_ms = int(((time.monotonic() if ended is None else ended) - started) * 1000)
    DispatchAttempt.objects.filter(pk=attempt.pk).update(
        outcome=outcome, ended_at=timezone.now(), latency_ms=latency_ms, **fields
    )
    attempt_report(attempt=attempt, outcome=outcome, latency_ms=latency_ms, fields=fields)


def attempt_finish_failed(
    *, attempt: DispatchAttempt, started: float, outcome: str, ended: float | None = None, **fields: Any
) -> None:
    """attempt_finish for a send that ended in an error (transient, ambiguous, permanent), with
    its `attempt.failed` event for the client's callbacks in the same transaction: the message's
    event number first (every writer locks the message before its attempts), then the attempt."""
    latency_ms = int(((time.monotonic() if ended is None else ended) - started) * 1000)
    now = timezone.now()
    with transaction.atomic():
        callbacks_attempt_failed(
            message_id=attempt.message_id,
            number=attempt.number,
            provider=attempt.provider,
            outcome=outcome,
            error=fields,
            at=now,
        )
        DispatchAttempt.objects.filter(pk=attempt.pk).update(
            outcome=outcome, ended_at=now, latency_ms=latency_ms, **fields
        )
    attempt_report(attempt=attempt, outcome=outcome, latency_ms=latency_ms, fields=fields)


def attempt_report(*, attempt: DispatchAttempt, outcome: str, latency_ms: int, fields: dict[str, Any]) -> None:
    """The log line and metrics of an attempt whose row is written (one or many at a time)."""
    channel = attempt.channel or attempt.message.channel
    error_type = fields.get("error_type", "")
    attempt_count(channel=channel, provider=attempt.provider, outcome=outcome, error_type=error_type)
    logger.info(
        "message %s attempt %d via %s: %s%s (%d ms)",
        attempt.message_id,
        attempt.number,
        attempt.provider,
        outcome,
        f" {error_type}" if error_type else "",
        latency_ms,
        extra={
            "event": "attempt",
            "message_id": str(attempt.message_id),
            "attempt": attempt.number,
            "send_generation": attempt.send_generation,
            "channel": channel,
            "provider": attempt.provider,
            "outcome": outcome,
            "error_type": error_type,
            "error_code": fields.get("error_code", ""),
            "latency_ms": latency_ms,
            "note": attempt.note,
            "to": masked(attempt.message.to),
        },
    )


def error_fields(exc: ProviderError) -> dict[str, str]:
    return {"error_type": exc.error_type, "error_code": exc.code, "error_message": str(exc)[:2000]}


def _last_error(exc: ProviderError) -> dict[str, str]:
    return {f"last_{name}": value for name, value in error_fields(exc).items()}


def message_record_dispatched(
    *, message: Message, attempt: DispatchAttempt, result: SendResult, started: float, outcome: str
) -> None:
    """The provider has it (accepted now, or found by a look-up): the transition and the attempt,
    in one transaction (messaging.dispatch._record_accepted says why)."""
    reference = {
        "provider": attempt.provider,
        "provider_message_id": result.provider_message_id,
        "needs_provider_lookup": False,
    }
    with transaction.atomic():
        applied = message_transition(
            message_id=message.pk,
            to_state=MessageState.DISPATCHED,
            source=EventSource.WORKER,
            detail=accepted_detail(attempt.provider, result),
            fields={**RELEASE, **reference},
        )
        attempt_finish(
            attempt=attempt, started=started, outcome=outcome, provider_message_id=result.provider_message_id
        )
    if not applied:
        message_record_dispatched_after_receipt(message=message, reference=reference)


def accepted_detail(provider: str, result: SendResult) -> str:
    return f"{provider} accepted it as {result.provider_message_id} ({result.provider_status})"


def message_record_dispatched_after_receipt(*, message: Message, reference: dict[str, Any]) -> None:
    """A receipt overtook our dispatched write (already delivered or read): keep the provider's
    reference and the dispatch time, which the receipt could not know."""
    Message.objects.filter(pk=message.pk).update(**RELEASE, **reference)
    dispatched_at = timezone.now()
    if Message.objects.filter(pk=message.pk, dispatched_at__isnull=True).update(dispatched_at=dispatched_at):
        latency_observe(
            to_state=MessageState.DISPATCHED,
            channel=message.channel,
            priority=message.priority,
            accepted_at=message.accepted_at or message.created_at,
            at=dispatched_at,
        )


def message_schedule_retry(
    *, message: Message, error: ProviderError, ambiguous: bool, counted: bool = True, at_least_s: float = 0.0
) -> None:
    """Wait and try again (full-jitter backoff), or dead-letter when the retry budget is spent.

    `counted` is False when no provider was actually tried (every circuit open): that round
    spends none of the budget; the deadline still bounds it.
    """
    policy = retry_policy_for(message.priority, message.category)
    rounds = message.failed_rounds + (1 if counted else 0)
    if counted and rounds >= policy.max_attempts:
        reason = f"{rounds} rounds of attempts failed; last: {error}"
        message_dead_letter(
            message=message, error_type=error.error_type, code=error.code, reason=reason, failed_rounds=rounds
        )
        return
    now = timezone.now()
    delay = error.retry_after if error.retry_after is not None else backoff_delay(policy, max(rounds, 1))
    delay = max(delay, at_least_s)
    # Retries stop at the deadline: the attempt due then finds it expired.
    next_at = min(now + timedelta(seconds=delay), message.expires_at)
    countdown = max(0.0, (next_at - now).total_seconds())
    publish_now = countdown <= messaging_setting("MAX_COUNTDOWN_SECONDS")
    # Only while still accepted: a receipt may have arrived during the call (the provider had it).
    scheduled = Message.objects.filter(pk=message.pk, state=MessageState.ACCEPTED).update(
        next_attempt_at=next_at,
        enqueued_at=next_at if publish_now else None,
        lease_expires_at=None,
        failed_rounds=rounds,
        # Still unknown if this attempt was itself ambiguous or its look-up did not complete.
        needs_provider_lookup=ambiguous or message.needs_provider_lookup,
        **_last_error(error),
    )
    if not scheduled:
        Message.objects.filter(pk=message.pk).update(lease_expires_at=None)
        logger.info("message %s moved on during its attempt; no retry", message.pk)
        return
    # The provider's error text may quote the recipient: masked (kept whole on the row).
    logger.info(
        "message %s: %s (%s); next attempt in %.1fs", message.pk, error.error_type, scrubbed(str(error)), countdown
    )
    if publish_now:
        message_publish(message_id=message.pk, channel=message.channel, priority=message.priority, countdown=countdown)


def message_reschedule(*, message: Message, wait_s: float) -> None:
    """Give the message back for `wait_s` without spending its budget (e.g. a rate-limit slot)."""
    next_at = min(timezone.now() + timedelta(seconds=wait_s), message.expires_at)
    countdown = max(0.0, (next_at - timezone.now()).total_seconds())
    publish_now = countdown <= messaging_setting("MAX_COUNTDOWN_SECONDS")
    Message.objects.filter(pk=message.pk, state=MessageState.ACCEPTED).update(
        next_attempt_at=next_at, enqueued_at=next_at if publish_now else None, lease_expires_at=None
    )
    if publish_now:
        message_publish(message_id=message.pk, channel=message.channel, priority=message.priority, countdown=countdown)


def message_record_failed(*, message: Message, error: ProviderError) -> None:
    message_transition(
        message_id=message.pk,
        to_state=MessageState.FAILED,
        source=EventSource.WORKER,
        detail=f"permanent error: {error}",
        fields={**RELEASE, **_last_error(error)},
    )


def message_record_expired(*, message: Message, error: ProviderError) -> None:
    """Its deadline leaves too little time for any provider of its route (each one's shortest
    validity is more): expired, never handed over."""
    message_transition(
        message_id=message.pk,
        to_state=MessageState.EXPIRED,
        source=EventSource.WORKER,
        detail=f"deadline too close: {error}",
        fields={**RELEASE, **_last_error(error)},
    )


def message_dead_letter(*, message: Message, error_type: str, code: str, reason: str, **fields: Any) -> None:
    last_error = {"last_error_type": error_type, "last_error_code": code, "last_error_message": reason[:2000]}
    message_transition(
        message_id=message.pk,
        to_state=MessageState.DEAD_LETTERED,
        source=EventSource.WORKER,
        detail=reason,
        fields={**RELEASE, **last_error, **fields},
    )
