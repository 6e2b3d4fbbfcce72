"""Fallback on silence (issue 24, docs/silence-fallback.md): a dispatched message of an opted-in
category with no final receipt within its time, or reported undelivered, is sent once more
through its route's next provider or channel.

A second copy can deliver twice (the first receipt may only be late), so it is off unless
SILENCE_FALLBACK names the category, and it happens at most once per message:
`Message.silence_fallback_at` is set by a conditional UPDATE (the claim: of two sweepers, or a
sweeper and the receipt applier, one wins) before the copy's task is published, and the task
sends only for a claimed message with no fallback attempt yet. The copy is a new send generation
(its own idempotency token: no provider takes it for a retry of the first). A message stays
`dispatched` while its copy is out; an undelivered one is dispatched again when its copy is
accepted (the one transition back from undelivered, messaging.states.GUARDED_TRANSITIONS). What
the first provider reports afterwards is a late receipt (messaging.receipts): kept and shown on
the message's timeline, a delivery applied (the recipient has it), a failure never applied.

At most once, not at least once: a copy whose task is lost (a broker outage between the claim and
the task) is not sent, and the message stays as it was without the fallback; the log says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from celery import current_app
from django.db import connection, transaction
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.lookup import send_request
from messaging.metrics import silence_fallback_count
from messaging.models import AttemptOutcome, DispatchAttempt, EventSource, Message, MessageEvent
from messaging.outcomes import attempt_finish, attempt_finish_failed, attempts_start, error_fields
from messaging.routing import Channel, Hop, message_route, queue_name
from messaging.rows import rows_insert
from messaging.services import message_transition
from messaging.states import MessageState
from messaging.suppressions.selectors import SuppressionIndex
from messaging.whatsapp_session import whatsapp_sessions_open
from providers.base import validity_too_short
from providers.guards import circuit_breaker
from providers.registry import get_provider, provider_class
from providers.types import AmbiguousProviderError, ProviderError, TransientProviderError

logger = logging.getLogger(__name__)

SILENCE_FALLBACK_TASK = "messaging.silence_fallback"
# Why a copy was sent: no final receipt within after_seconds, or the provider said undelivered.
REASON_SILENCE = "silence"
REASON_UNDELIVERED = "undelivered"
# The note of a copy's attempt row: how the task knows a copy went already (a redelivered task).
NOTE_PREFIX = "silence fallback"
# Only messages whose silence began within this window are looked at: an index range that stays
# small however many messages never receipt (email without tracking), and a sweeper that was down
# for longer sends no stale copies when it comes back.
LOOKBACK = timedelta(hours=1)
# States a claimed copy may still go out from: its first send silent, or reported undelivered.
_SENDABLE = (MessageState.DISPATCHED, MessageState.UNDELIVERED)


def silence_fallback_policies() -> dict[str, float]:
    """{category: after_seconds} for the opted-in categories ({} by default: off)."""
    return {
        category: float(policy["after_seconds"]) for category, policy in messaging_setting("SILENCE_FALLBACK").items()
    }


def silence_fallback_opted_in(category: str) -> bool:
    return bool(category) and category in messaging_setting("SILENCE_FALLBACK")


@dataclass(frozen=True)
class Claimed:
    message_id: Any
    channel: str
    priority: str
    reason: str


def messages_silence_sweep(*, now: datetime | None = None, limit: int = 500) -> int:
    """The sweeper's part: claim the opted-in messages still dispatched after_seconds after their
    dispatch (a range of message_awaiting_receipt per category) and publish each one's copy.
    Returns how many were claimed."""
    now = now or timezone.now()
    claimed: list[Claimed] = []
    for category, after_seconds in silence_fallback_policies().items():
        cutoff = now - timedelta(seconds=after_seconds)
        silent = list(
            Message.objects.filter(
                state=MessageState.DISPATCHED,
                dispatched_at__lte=cutoff,
                dispatched_at__gt=cutoff - LOOKBACK,
                category=category,
                silence_fallback_at__isnull=True,
                expires_at__gt=now,  # a code past its deadline is worth no copy
            )
            .order_by("dispatched_at")
            .values_list("pk", flat=True)[:limit]
        )
        claimed += messages_silence_claim(
            message_ids=silent, reason=REASON_SILENCE, states=(MessageState.DISPATCHED,), now=now
        )
    for claim in claimed:
        silence_fallback_publish(claim)
    return len(claimed)


def messages_silence_claim(
    *, message_ids: list[Any], reason: str, states: tuple[str, ...], now: datetime | None = None
) -> list[Claimed]:
    """Mark these messages for their one copy, those still in `states` and never claimed: one
    conditional UPDATE, so of two claimers (two sweeps, a sweep and the receipt applier) exactly one
    gets each message. Returns the claims won; the caller publishes them (silence_fallback_publish)."""
    if not message_ids:
        return []
    now = now or timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {Message._meta.db_table} SET silence_fallback_at = %s"
            " WHERE id = ANY(%s::uuid[]) AND silence_fallback_at IS NULL AND state = ANY(%s)"
            " RETURNING id, channel, priority",
            [now, [str(pk) for pk in message_ids], list(states)],
        )
        rows = cursor.fetchall()
    for message_id, _, _ in rows:
        logger.info("message %s: claimed for a fallback on silence (%s)", message_id, reason)
    return [Claimed(message_id, channel, priority, reason) for message_id, channel, priority in rows]


def silence_fallback_publish(claim: Claimed) -> bool:
    """The copy's task, on the message's own queue. A failure is logged: that copy is not sent."""
    try:
        current_app.send_task(
            SILENCE_FALLBACK_TASK,
            args=[str(claim.message_id), claim.reason],
            queue=queue_name(claim.channel, claim.priority),
            retry=False,
        )
    except Exception:
        logger.error("message %s: could not publish its fallback on silence; no copy is sent", claim.message_id)
        return False
    return True


_FIELDS = (
    *("id", "client_id", "channel", "to", "body", "subject", "priority", "category", "expires_at"),
    *("template", "template_variables", "fallback_channels", "fallback_to", "send_generation", "attempt_count"),
    *("state", "provider", "provider_message_id", "silence_fallback_at", "accepted_at", "created_at"),
)


def message_silence_fallback(*, message_id: Any, reason: str) -> bool:
    """The copy's task: send a claimed message once more through its route's next usable hop.
    Returns whether a provider accepted the copy."""
    prepared = _prepare(message_id, reason)
    if prepared is None:
        return False
    message, hop, attempt, permit, first_provider = prepared
    started = time.monotonic()
    error: ProviderError | None = None
    try:
        result = get_provider(hop.provider).send(send_request(message, hop))
    except ProviderError as exc:
        error = exc
    ended = time.monotonic()
    failed = isinstance(error, TransientProviderError | AmbiguousProviderError)
    circuit_breaker(hop.provider).record(permit, failed=failed, duration_s=ended - started)
    if error is not None:
        attempt_finish_failed(
            attempt=attempt, started=started, ended=ended, outcome=_error_outcome(error), **error_fields(error)
        )
        _note(message, f"{NOTE_PREFIX} through {hop.provider} failed ({error.error_type}): {error}"[:2000])
        silence_fallback_count(
            category=message.category, provider=hop.provider, reason=reason, outcome=str(error.error_type)
        )
        return False
    detail = (
        f"{NOTE_PREFIX} ({_why(reason, first_provider, message.category)}): "
        f"sent again through {hop.provider} as {result.provider_message_id}"
    )
    reference = {
        "provider": hop.provider,
        "provider_message_id": result.provider_message_id,
        "receipt_polled_at": None,
        "receipt_unknown_at": None,
    }
    with transaction.atomic():
        state = Message.objects.select_for_update().values_list("state", flat=True).get(pk=message.pk)
        if state == MessageState.UNDELIVERED:
            message_transition(
                message_id=message.pk,
                to_state=MessageState.DISPATCHED,
                source=EventSource.FALLBACK,
                detail=detail,
                fields=reference,
            )
        elif state == MessageState.DISPATCHED:
            # Stays dispatched, now waiting for the copy's receipt: the copy's reference, so polling
            # and receipts follow it; the first provider's receipts are matched by its attempt.
            Message.objects.filter(pk=message.pk).update(**reference)
            _note(message, detail, state=state, applied=True)
        else:  # the first copy was delivered while this one was sent: its reference stays
            _note(message, f"{detail}; the first copy was {state} meanwhile", state=state)
        attempt_finish(
            attempt=attempt,
            started=started,
            ended=ended,
            outcome=AttemptOutcome.ACCEPTED,
            provider_message_id=result.provider_message_id,
        )
    silence_fallback_count(category=message.category, provider=hop.provider, reason=reason, outcome="accepted")
    logger.warning("message %s: %s", message.pk, detail)
    return True


def _prepare(message_id: Any, reason: str) -> tuple[Message, Hop, DispatchAttempt, Any, str] | None:
    """Under the message's row lock: check the claim still calls for a copy, choose its hop, start
    a new send generation and its in-progress attempt row. None: nothing to send (logged)."""
    now = timezone.now()
    with transaction.atomic():
        message = Message.objects.select_for_update().only(*_FIELDS).filter(pk=message_id).first()
        if message is None or message.silence_fallback_at is None:
            logger.warning("silence fallback for %s: not claimed; nothing sent", message_id)
            return None
        if DispatchAttempt.objects.filter(message=message, note__startswith=NOTE_PREFIX).exists():
            logger.info("message %s: its copy was sent already (a redelivered task)", message_id)
            return None
        if message.state not in _SENDABLE:
            _note(message, f"{NOTE_PREFIX} not sent: the message is {message.state} now")
            return None
        if message.expires_at <= now:
            _note(message, f"{NOTE_PREFIX} not sent: its deadline passed")
            return None
        first_provider = message.provider
        found = _next_hop(message, now)
        if isinstance(found, str):
            _note(message, f"{NOTE_PREFIX} not sent: {found}")
            silence_fallback_count(category=message.category, provider="", reason=reason, outcome="no_hop")
            return None
        hop, permit = found
        # A new generation: its own idempotency token, so no provider takes the copy for a retry of
        # the first send and drops it. Counters written here, not by attempts_start, which would
        # also name the copy's provider on the message before it has the copy's id (the first
        # provider's receipts are matched by that pair until the copy is accepted).
        message.send_generation += 1
        [attempt] = attempts_start(
            starts=[(message, hop, f"{NOTE_PREFIX} after {first_provider} ({reason})")], counters=False
        )
        message.provider = first_provider
        Message.objects.filter(pk=message.pk).update(
            send_generation=message.send_generation, attempt_count=message.attempt_count
        )
    return message, hop, attempt, permit, first_provider


def _next_hop(message: Message, now: datetime) -> tuple[Hop, Any] | str:
    """The first hop after the one that took the message that may take a copy now: not its address
    suppressed, not a free-form WhatsApp hop with its window closed, its provider's shortest validity
    within the time left, its circuit not open. Returns it with its circuit permit, or why none."""
    route = message_route(
        channel=message.channel,
        to=message.to,
        fallback_channels=message.fallback_channels,
        fallback_to=message.fallback_to,
    )
    taken = (
        DispatchAttempt.objects.filter(
            message=message, outcome__in=[AttemptOutcome.ACCEPTED, AttemptOutcome.FOUND_AT_PROVIDER]
        )
        .order_by("-number")
        .values_list("provider", "channel")
        .first()
    )
    provider, channel = taken if taken else (message.provider, message.channel)
    channel = channel or message.channel
    index = next((i for i, hop in enumerate(route) if (hop.provider, hop.channel) == (provider, channel)), None)
    later = route[index + 1 :] if index is not None else [hop for hop in route if hop.provider != provider]
    if not later:
        return f"no provider or channel after {provider} on its route"
    suppressions = SuppressionIndex.load((message.client_id, hop.channel, hop.to) for hop in later)
    free_form = {hop.to for hop in later if hop.channel == Channel.WHATSAPP} if not message.template else set()
    open_sessions = whatsapp_sessions_open(addresses=free_form, now=now)
    why = []
    for hop in later:
        blocker = suppressions.blocking(
            client_id=message.client_id, channel=hop.channel, address=hop.to, category=message.category
        )
        if blocker is not None:
            why.append(f"{hop.provider} ({hop.channel}): suppressed ({blocker.reason})")
            continue
        if hop.to in free_form and hop.to not in open_sessions:
            why.append(f"{hop.provider} (whatsapp): outside the session window")
            continue
        validity = provider_class(hop.provider).validity_seconds
        left = message.expires_at - now
        if validity is not None and left < timedelta(seconds=validity[0]):
            why.append(f"{hop.provider}: {validity_too_short(hop.provider, validity[0], left)}")
            continue
        permit = circuit_breaker(hop.provider).allow(priority=message.priority)
        if permit is None:
            why.append(f"{hop.provider}: circuit open")
            continue
        return hop, permit
    return "no usable hop after " + provider + ": " + "; ".join(why)


def _error_outcome(error: ProviderError) -> str:
    if isinstance(error, TransientProviderError):
        return AttemptOutcome.TRANSIENT_ERROR
    if isinstance(error, AmbiguousProviderError):
        return AttemptOutcome.AMBIGUOUS
    return AttemptOutcome.PERMANENT_ERROR


def _why(reason: str, provider: str, category: str) -> str:
    if reason == REASON_UNDELIVERED:
        return f"{provider} reported it undelivered; category {category!r} opted in"
    return f"no final receipt from {provider} in time; category {category!r} opted in"


def _note(message: Message, detail: str, *, state: str | None = None, applied: bool = False) -> None:
    """An event on the message's timeline that changes no state (the fallback's own steps)."""
    state = state or message.state
    rows_insert(
        MessageEvent,
        [
            MessageEvent(
                message_id=message.pk,
                created_at=timezone.now(),
                source=EventSource.FALLBACK,
                from_state=state,
                to_state=state,
                applied=applied,
                detail=detail[:2000],
            )
        ],
    )
    logger.info("message %s: %s", message.pk, detail)
