"""Resolving a send whose outcome is unknown by asking the provider, never by a blind resend."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.utils import timezone

from messaging.models import UNKNOWN_OUTCOMES, AttemptOutcome, DispatchAttempt, ErrorType, Message
from messaging.outcomes import (
    attempt_finish,
    attempts_start,
    error_fields,
    message_dead_letter,
    message_record_dispatched,
    message_schedule_retry,
)
from messaging.routing import Channel, Hop
from messaging.suppressions.unsubscribe import list_unsubscribe_headers
from providers.base import Provider
from providers.registry import get_provider
from providers.types import AmbiguousProviderError, ProviderError, SendRequest, SendResult

logger = logging.getLogger(__name__)

# The note on a look-up's attempt row: it asks the provider, it does not send.
LOOKUP_NOTE = "look-up after an unknown outcome"


def unknown_send(message: Message, default: Hop) -> tuple[Hop, int]:
    """The hop whose outcome is unknown and its send generation: the last one that reached (or may
    have reached) a provider. After a replay it belongs to the generation that was given up on."""
    last = (
        DispatchAttempt.objects.filter(message=message, outcome__in=UNKNOWN_OUTCOMES)
        .order_by("-number")
        .values_list("provider", "channel", "send_generation")
        .first()
    )
    if last is None:
        return default, message.send_generation
    provider, channel, generation = last
    channel = channel or message.channel
    to = message.to if channel == message.channel else message.fallback_to.get(channel, message.to)
    return Hop(channel, to, provider), generation


def send_request(
    message: Message, hop: Hop, attempted_since: datetime | None = None, generation: int | None = None
) -> SendRequest:
    """What goes to the provider; a look-up may name an earlier generation's token. A bulk or list
    email carries List-Unsubscribe headers (messaging.suppressions.unsubscribe)."""
    subject = message.subject
    headers: dict[str, str] = {}
    if hop.channel == Channel.EMAIL:
        if not subject:
            subject = message.body.splitlines()[0][:78] if message.body else "Message"
        headers = list_unsubscribe_headers(
            client_id=message.client_id, address=hop.to, category=message.category, priority=message.priority
        )
    return SendRequest(
        message_id=str(message.pk),
        token=message.send_token if generation is None else f"{message.pk}.{generation}",
        channel=hop.channel,
        to=hop.to,
        body=message.body,
        subject=subject,
        attempted_since=attempted_since,
        headers=headers,
        expires_at=message.expires_at,
        template=message.template if hop.channel == Channel.WHATSAPP else "",
        template_variables=message.template_variables if hop.channel == Channel.WHATSAPP else {},
    )


def message_resolve_unknown_outcome(*, message: Message, route: list[Hop]) -> bool:
    """Ask the provider of the unknown attempt (else the route's first) whether it has the message.

    Returns True when that settled this claim (found and recorded, retry scheduled, or
    dead-lettered), False when the provider positively has no record: the caller may send.
    """
    # Without an attempt row to name it, the provider last handed it (the route's order may have
    # changed since: messaging.route_health), else the route's first.
    default = next((hop for hop in route if hop.provider == message.provider), route[0])
    hop, generation = unknown_send(message, default=default)
    provider = get_provider(hop.provider)
    if not provider.supports_lookup:
        reason = (
            f"the outcome of an earlier send is unknown and {hop.provider} cannot be asked; replay if it never arrived"
        )
        message_dead_letter(message=message, error_type=ErrorType.PROVIDER_TIMEOUT, code="no_lookup", reason=reason)
        return True
    first = (
        DispatchAttempt.objects.filter(message=message, send_generation=generation)
        .order_by("started_at")
        .values_list("started_at", flat=True)
        .first()
    )
    [attempt] = attempts_start(starts=[(message, hop, LOOKUP_NOTE)], generation=generation)
    started = time.monotonic()
    try:
        found = _unclaimed(provider.find_send(send_request(message, hop, first, generation)), message, hop.provider)
        if found is None:
            _raise_if_unsettled(message, provider, generation)
    except ProviderError as exc:
        # Whatever the look-up's trouble, the outcome is still unknown: ask again later.
        attempt_finish(attempt=attempt, started=started, outcome=AttemptOutcome.AMBIGUOUS, **error_fields(exc))
        message_schedule_retry(message=message, error=exc, ambiguous=True)
        return True
    if found is not None:
        logger.info("message %s: %s already had it (%s)", message.pk, hop.provider, found.provider_message_id)
        message_record_dispatched(
            message=message, attempt=attempt, result=found, started=started, outcome=AttemptOutcome.FOUND_AT_PROVIDER
        )
        return True
    attempt_finish(attempt=attempt, started=started, outcome=AttemptOutcome.NOT_FOUND_AT_PROVIDER)
    Message.objects.filter(pk=message.pk).update(needs_provider_lookup=False)
    message.needs_provider_lookup = False
    logger.info("message %s: %s has no record of it; it may be sent", message.pk, hop.provider)
    return False


def _raise_if_unsettled(message: Message, provider: Provider, generation: int) -> None:
    """An empty look-up is only trusted once the provider's records have caught up.

    Reports and event logs (Vonage, Mailgun) lag behind the send API, so "no record" right after
    an ambiguous attempt may mean "not indexed yet": wait LOOKUP_SETTLE_SECONDS before resending.
    """
    settle = float(provider.setting("LOOKUP_SETTLE_SECONDS"))
    if not settle:
        return
    last_unknown = (
        DispatchAttempt.objects.filter(message=message, send_generation=generation, outcome__in=UNKNOWN_OUTCOMES)
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


def _unclaimed(candidates: list[SendResult], message: Message, provider_name: str) -> SendResult | None:
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
