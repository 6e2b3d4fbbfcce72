"""The send path: claim a message, resolve unknown outcomes, call the provider, record what happened.

Each step is its own short write: no transaction and no row lock is held across network I/O,
and the lease (lease_expires_at) is what keeps two workers from sending one message at once.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from django.db.models import F, Q
from django.utils import timezone

from messaging.conf import conductor_setting
from messaging.logging import masked
from messaging.models import AttemptOutcome, DispatchAttempt, ErrorType, EventSource, Message
from messaging.routing import backoff_delay, retry_policy_for
from messaging.services import message_publish, message_transition
from messaging.states import MessageState
from providers.base import (
    AmbiguousProviderError,
    PermanentProviderError,
    Provider,
    ProviderError,
    SendRequest,
    SendResult,
    TransientProviderError,
)
from providers.registry import get_provider

logger = logging.getLogger(__name__)

# A countdown task may fire a little before next_attempt_at by the database's clock.
EARLY_TOLERANCE = timedelta(seconds=1)
# Fields every final write of a claimed message clears: the lease and any scheduled retry.
RELEASE = {"lease_expires_at": None, "next_attempt_at": None, "enqueued_at": None}


def unleased(now: Any) -> Q:
    return Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)


def message_dispatch(*, message_id: str) -> None:
    """Try to send one message; a duplicate or early task finds nothing to claim and returns."""
    lease = _claim(message_id)
    if lease is None:
        return
    try:
        _dispatch_claimed(message_id)
    finally:
        # Normally already released by the final write; this covers an exception on the way.
        Message.objects.filter(pk=message_id, lease_expires_at=lease).update(lease_expires_at=None)


def _claim(message_id: str) -> Any:
    now = timezone.now()
    lease = now + timedelta(seconds=conductor_setting("DISPATCH_LEASE_SECONDS"))
    due = Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now + EARLY_TOLERANCE)
    claimed = (
        Message.objects.filter(pk=message_id, state=MessageState.ACCEPTED)
        .filter(unleased(now))
        .filter(due)
        .update(lease_expires_at=lease, enqueued_at=None)
    )
    return lease if claimed else None


def _dispatch_claimed(message_id: str) -> None:
    message = Message.objects.get(pk=message_id)
    now = timezone.now()
    if _record_lost_attempts(message, now) >= conductor_setting("MAX_WORKER_LOSSES"):
        _dead_letter(message, ErrorType.WORKER_LOST, "", f"its worker died {message.worker_loss_count} times")
        return
    if message.expires_at <= now:
        message_transition(
            message_id=message.pk,
            to_state=MessageState.EXPIRED,
            source=EventSource.WORKER,
            detail="deadline passed before dispatch",
            fields={**RELEASE, "last_error_type": ErrorType.EXPIRED},
        )
        return
    route = conductor_setting("ROUTES").get(message.channel) or []
    if not route:
        _fail(message, None, PermanentProviderError("no provider is configured", error_type=ErrorType.NO_ROUTE))
        return
    _attempt(message, route[0], now)


def _record_lost_attempts(message: Message, now: Any) -> int:
    """Close attempts left in progress by a worker that died (we hold the lease, so theirs
    expired) and return how many times this message has lost its worker."""
    lost = DispatchAttempt.objects.filter(message=message, outcome=AttemptOutcome.IN_PROGRESS).update(
        outcome=AttemptOutcome.WORKER_LOST, ended_at=now, error_type=ErrorType.WORKER_LOST
    )
    if lost:
        # The dead worker may have reached the provider: look before sending again.
        Message.objects.filter(pk=message.pk).update(
            worker_loss_count=F("worker_loss_count") + lost, needs_provider_lookup=True
        )
        message.refresh_from_db()
        logger.warning("message %s: %d attempt(s) lost with their worker", message.pk, lost)
    return message.worker_loss_count


def _send_request(message: Message) -> SendRequest:
    first = None
    if message.needs_provider_lookup:  # only a look-up needs to know since when to search
        first = (
            DispatchAttempt.objects.filter(message=message, send_generation=message.send_generation)
            .order_by("started_at")
            .values_list("started_at", flat=True)
            .first()
        )
    return SendRequest(
        message_id=str(message.pk),
        token=message.send_token,
        channel=message.channel,
        to=message.to,
        body=message.body,
        subject=message.subject,
        attempted_since=first,
    )


def _attempt(message: Message, provider_name: str, now: Any) -> None:
    provider = get_provider(provider_name)
    if message.needs_provider_lookup and not provider.supports_lookup:
        reason = (
            f"the outcome of an earlier send is unknown and {provider_name} cannot be asked; replay if it never arrived"
        )
        _dead_letter(message, ErrorType.PROVIDER_TIMEOUT, "no_lookup", reason)
        return
    request = _send_request(message)
    message.attempt_count += 1
    attempt = DispatchAttempt.objects.create(
        message=message,
        number=message.attempt_count,
        send_generation=message.send_generation,
        provider=provider_name,
        started_at=now,
    )
    Message.objects.filter(pk=message.pk).update(attempt_count=F("attempt_count") + 1, provider=provider_name)
    started = time.monotonic()
    try:
        if message.needs_provider_lookup:
            found = _find_unclaimed(provider.find_send(request), message, provider_name)
            if found is not None:
                logger.info("message %s: the provider already had it (%s)", message.pk, found.provider_message_id)
                _accepted(message, attempt, found, started, AttemptOutcome.FOUND_AT_PROVIDER)
                return
            _raise_if_lookup_unsettled(message, provider)
            logger.info("message %s: the provider has no record of it; sending", message.pk)
            message.needs_provider_lookup = False
        result = provider.send(request)
    except TransientProviderError as exc:
        _retry_later(message, attempt, exc, started, ambiguous=False)
    except AmbiguousProviderError as exc:
        _retry_later(message, attempt, exc, started, ambiguous=True)
    except PermanentProviderError as exc:
        _fail(message, attempt, exc, started)
    else:
        _accepted(message, attempt, result, started, AttemptOutcome.ACCEPTED)


def _raise_if_lookup_unsettled(message: Message, provider: Provider) -> None:
    """An empty look-up is only trusted once the provider's records have caught up.

    Reports and event logs (Vonage, Mailgun) lag behind the send API, so "no record" right after
    an ambiguous attempt may mean "not indexed yet": wait LOOKUP_SETTLE_SECONDS before resending.
    """
    settle = float(provider.config.get("LOOKUP_SETTLE_SECONDS", 0))
    if not settle:
        return
    last_unknown = (
        DispatchAttempt.objects.filter(
            message=message,
            send_generation=message.send_generation,
            outcome__in=[AttemptOutcome.AMBIGUOUS, AttemptOutcome.WORKER_LOST],
        )
        .order_by("-ended_at")
        .values_list("ended_at", flat=True)
        .first()
    )
    if last_unknown and timezone.now() - last_unknown < timedelta(seconds=settle):
        raise AmbiguousProviderError(
            f"{provider.name} shows no record yet; waiting {settle:.0f}s for its records to settle",
            error_type=ErrorType.UNKNOWN,
            code="lookup_unsettled",
        )


def _find_unclaimed(candidates: list[SendResult], message: Message, provider_name: str) -> SendResult | None:
    """The provider's candidate not already attributed to another of our messages."""
    for candidate in candidates:
        taken = (
            Message.objects.filter(provider=provider_name, provider_message_id=candidate.provider_message_id)
            .exclude(pk=message.pk)
            .exists()
        )
        if not taken:
            return candidate
    return None


def _finish_attempt(attempt: DispatchAttempt, started: float, outcome: str, **fields: Any) -> None:
    latency_ms = int((time.monotonic() - started) * 1000)
    DispatchAttempt.objects.filter(pk=attempt.pk).update(
        outcome=outcome, ended_at=timezone.now(), latency_ms=latency_ms, **fields
    )


def _accepted(message: Message, attempt: DispatchAttempt, result: SendResult, started: float, outcome: str) -> None:
    _finish_attempt(attempt, started, outcome, provider_message_id=result.provider_message_id)
    reference = {
        "provider": attempt.provider,
        "provider_message_id": result.provider_message_id,
        "needs_provider_lookup": False,
    }
    applied = message_transition(
        message_id=message.pk,
        to_state=MessageState.DISPATCHED,
        source=EventSource.WORKER,
        detail=f"{attempt.provider} accepted it as {result.provider_message_id} ({result.provider_status})",
        fields={**RELEASE, **reference},
    )
    if not applied:
        # A receipt overtook our write (already delivered or read): keep the provider's reference.
        Message.objects.filter(pk=message.pk).update(**RELEASE, **reference)
        Message.objects.filter(pk=message.pk, dispatched_at__isnull=True).update(dispatched_at=timezone.now())
    logger.info("message %s dispatched via %s to %s", message.pk, attempt.provider, masked(message.to))


def _error_fields(exc: ProviderError) -> dict[str, str]:
    return {"error_type": exc.error_type, "error_code": exc.code, "error_message": str(exc)[:2000]}


def _last_error(exc: ProviderError) -> dict[str, str]:
    return {f"last_{name}": value for name, value in _error_fields(exc).items()}


def _retry_later(
    message: Message, attempt: DispatchAttempt, exc: ProviderError, started: float, *, ambiguous: bool
) -> None:
    outcome = AttemptOutcome.AMBIGUOUS if ambiguous else AttemptOutcome.TRANSIENT_ERROR
    _finish_attempt(attempt, started, outcome, **_error_fields(exc))
    policy = retry_policy_for(message.priority, message.category)
    if message.attempt_count >= policy.max_attempts:
        _dead_letter(message, exc.error_type, exc.code, f"{message.attempt_count} attempts failed; last: {exc}")
        return
    now = timezone.now()
    delay = exc.retry_after if exc.retry_after is not None else backoff_delay(policy, message.attempt_count)
    # Retries stop at the deadline: the attempt due then finds it expired.
    next_at = min(now + timedelta(seconds=delay), message.expires_at)
    countdown = max(0.0, (next_at - now).total_seconds())
    publish_now = countdown <= conductor_setting("MAX_COUNTDOWN_SECONDS")
    # Only while still accepted: a receipt may have arrived during the call (the provider had it).
    scheduled = Message.objects.filter(pk=message.pk, state=MessageState.ACCEPTED).update(
        next_attempt_at=next_at,
        enqueued_at=next_at if publish_now else None,
        lease_expires_at=None,
        # Still unknown if this attempt was itself ambiguous or its look-up did not complete.
        needs_provider_lookup=ambiguous or message.needs_provider_lookup,
        **_last_error(exc),
    )
    if not scheduled:
        Message.objects.filter(pk=message.pk).update(lease_expires_at=None)
        logger.info("message %s moved on during attempt %d (%s); no retry", message.pk, message.attempt_count, outcome)
        return
    logger.info(
        "message %s attempt %d %s (%s); next attempt in %.1fs",
        message.pk,
        message.attempt_count,
        outcome,
        exc.error_type,
        countdown,
    )
    if publish_now:
        message_publish(message_id=message.pk, channel=message.channel, priority=message.priority, countdown=countdown)


def _fail(message: Message, attempt: DispatchAttempt | None, exc: ProviderError, started: float = 0.0) -> None:
    if attempt is not None:
        _finish_attempt(attempt, started, AttemptOutcome.PERMANENT_ERROR, **_error_fields(exc))
    message_transition(
        message_id=message.pk,
        to_state=MessageState.FAILED,
        source=EventSource.WORKER,
        detail=f"permanent error: {exc}",
        fields={**RELEASE, **_last_error(exc)},
    )


def _dead_letter(message: Message, error_type: str, code: str, reason: str) -> None:
    message_transition(
        message_id=message.pk,
        to_state=MessageState.DEAD_LETTERED,
        source=EventSource.WORKER,
        detail=reason,
        fields={**RELEASE, "last_error_type": error_type, "last_error_code": code, "last_error_message": reason[:2000]},
    )
