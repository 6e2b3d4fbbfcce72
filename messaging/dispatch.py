"""The send path: claim a message, settle unknown outcomes, walk its route, record what happened.

Each step is its own short write: no transaction and no row lock is held across network I/O,
and the lease (lease_expires_at) is what keeps two workers from sending one message at once.
The route is the channel's providers, then each fallback channel's: an open circuit or a
transient failure moves on to the next hop at once; only when every hop is unavailable does
the message wait (backoff). An ambiguous outcome never moves on: it is looked up first.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from typing import Any

from django.db.models import F
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.lookup import resolve_unknown_outcome, send_request
from messaging.models import AttemptOutcome, DispatchAttempt, ErrorType, EventSource, Message
from messaging.ordering import ordering_wait
from messaging.outcomes import (
    RELEASE,
    attempt_finish,
    attempt_start,
    dead_letter,
    error_fields,
    record_accepted,
    record_failed,
    reschedule_unchanged,
    schedule_retry,
)
from messaging.routing import Hop, message_route
from messaging.services import message_transition
from messaging.states import MessageState
from providers.guards import circuit_breaker, rate_limiter, seconds_until_half_open
from providers.ratelimit import wait_for_slot
from providers.registry import get_provider
from providers.types import AmbiguousProviderError, PermanentProviderError, ProviderError, TransientProviderError

logger = logging.getLogger(__name__)


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
    lease = now + timedelta(seconds=messaging_setting("DISPATCH_LEASE_SECONDS"))
    claimed = Message.objects.filter(pk=message_id).claimable(now).update(lease_expires_at=lease, enqueued_at=None)
    return lease if claimed else None


def _dispatch_claimed(message_id: str) -> None:
    message = Message.objects.get(pk=message_id)
    now = timezone.now()
    if _record_lost_attempts(message, now) >= messaging_setting("MAX_WORKER_LOSSES"):
        dead_letter(message, ErrorType.WORKER_LOST, "", f"its worker died {message.worker_loss_count} times")
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
    hops = message_route(
        channel=message.channel,
        to=message.to,
        fallback_channels=message.fallback_channels,
        fallback_to=message.fallback_to,
    )
    if not hops:
        record_failed(message, PermanentProviderError("no provider is configured", error_type=ErrorType.NO_ROUTE))
        return
    if message.needs_provider_lookup and resolve_unknown_outcome(message, hops):
        return
    if message.sequence is not None and ordering_wait(message):
        return  # an earlier message with the same ordering key goes first; it releases this one
    _walk(message, hops)


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


def _walk(message: Message, hops: list[Hop]) -> None:
    """Try each hop in order until one settles the message; wait only when all are unavailable."""
    last_error: ProviderError | None = None
    tried = False
    for index, hop in enumerate(hops):
        wait_s = wait_for_slot(rate_limiter(hop.provider))  # 0.0: a slot is ours (may have slept for it)
        if wait_s:
            # Our own throttle, not a failure: the same route, a little later, budget untouched.
            reschedule_unchanged(message, wait_s)
            return
        permit = circuit_breaker(hop.provider).allow(priority=message.priority)
        if permit is None:
            last_error = hop_skipped(message, hop)
            continue
        tried = True
        last_error = _send_hop(message, hop, permit, hop_note(hops, index, last_error))
        if last_error is None:
            return
    route_failed(message, hops, last_error, tried=tried)


def hop_note(hops: list[Hop], index: int, last_error: ProviderError | None) -> str:
    """Why this hop is tried, for its attempt row."""
    if index and last_error is not None:
        return f"fallback after {hops[index - 1].provider} ({last_error.error_type})"
    return "first choice"


def hop_skipped(message: Message, hop: Hop) -> TransientProviderError:
    """Record a hop passed over because its circuit is open; the error to move on from."""
    attempt_start(message, hop, f"skipped: {hop.provider} circuit open", outcome=AttemptOutcome.SKIPPED)
    return TransientProviderError(f"{hop.provider} circuit open", error_type=ErrorType.CIRCUIT_OPEN)


def route_failed(message: Message, hops: list[Hop], last_error: ProviderError | None, *, tried: bool) -> None:
    """Every hop was unavailable: wait and try again (or dead-letter when the budget is spent)."""
    assert last_error is not None
    if tried:
        schedule_retry(message, last_error, ambiguous=False)
        return
    # Every circuit open: no point asking before the first one lets a trial through; the jitter
    # keeps a whole backlog from arriving at that moment together.
    reopen_s = min(seconds_until_half_open(hop.provider) for hop in hops)
    schedule_retry(message, last_error, ambiguous=False, counted=False, at_least_s=reopen_s + random.uniform(0, 1))


# The three kinds an adapter sorts its failures into; anything else is a bug and propagates.
SEND_ERRORS = (TransientProviderError, AmbiguousProviderError, PermanentProviderError)


def breaker_failure(exc: ProviderError | None) -> bool:
    """Whether an outcome counts against the provider's health (one bad number does not)."""
    return isinstance(exc, (TransientProviderError, AmbiguousProviderError))


def _send_hop(message: Message, hop: Hop, permit: Any, note: str) -> TransientProviderError | None:
    """One provider call. Returns the transient error to move on from, or None when settled."""
    provider = get_provider(hop.provider)
    attempt = attempt_start(message, hop, note)
    started = time.monotonic()
    try:
        result = provider.send(send_request(message, hop))
    except SEND_ERRORS as exc:
        circuit_breaker(hop.provider).record(permit, failed=breaker_failure(exc), duration_s=time.monotonic() - started)
        return settle_error(message, hop, attempt, started, exc)
    circuit_breaker(hop.provider).record(permit, failed=False, duration_s=time.monotonic() - started)
    record_accepted(message, attempt, result, started, AttemptOutcome.ACCEPTED)
    return None


def settle_error(
    message: Message,
    hop: Hop,
    attempt: DispatchAttempt,
    started: float,
    exc: ProviderError,
    ended: float | None = None,
) -> TransientProviderError | None:
    """Record a failed provider call (its circuit already told). Returns the transient error to
    move on to the next hop with, or None when the message is settled for now."""
    if isinstance(exc, TransientProviderError):
        attempt_finish(attempt, started, AttemptOutcome.TRANSIENT_ERROR, ended, **error_fields(exc))
        if exc.retry_after:
            rate_limiter(hop.provider).penalize(exc.retry_after)  # slow it down for every worker
        return exc
    if isinstance(exc, AmbiguousProviderError):
        attempt_finish(attempt, started, AttemptOutcome.AMBIGUOUS, ended, **error_fields(exc))
        schedule_retry(message, exc, ambiguous=True)  # stays with this provider until looked up
        return None
    attempt_finish(attempt, started, AttemptOutcome.PERMANENT_ERROR, ended, **error_fields(exc))
    record_failed(message, exc)
    return None
