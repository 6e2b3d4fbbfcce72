"""ESP tracking events that feed the suppression list: a hard bounce, a spam complaint, an
unsubscribe, reported through anymail's tracking webhooks (any door: anymail's, ours, the intake).

They are read where receipts are applied (messaging.receipts), not in the webhook, for three
reasons: the webhook answers after one INSERT; only there is a receipt matched to a message we
handed to that provider, so the client (whose list it is) and the address we sent to are known,
and a rightly signed event about someone else's message suppresses nothing; and a receipt is
applied once, in the transaction that marks it processed, whichever door and however many
retries brought it (suppression_add is idempotent as well).

anymail normalises each ESP's events: Mailgun's `failed` of severity `permanent` is `bounced`, of
severity `temporary` `deferred` (a soft bounce: suppresses nothing, Mailgun retries).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from anymail.signals import EventType, RejectReason
from django.db import transaction

from messaging.models import ApiClient, Message, SuppressionReason
from messaging.routing import Channel
from messaging.suppressions.services import suppression_add
from messaging.suppressions.unsubscribe import list_unsubscribe_scope
from providers.mailgun import AnymailProvider
from providers.registry import provider_class

logger = logging.getLogger(__name__)

# anymail's event type (an email receipt's provider_status) -> the suppression it makes.
EVENT_REASONS: dict[str, str] = {
    EventType.BOUNCED: SuppressionReason.HARD_BOUNCE,  # covers the exempt categories too
    EventType.COMPLAINED: SuppressionReason.COMPLAINT,
    EventType.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBED,
}


def _is_esp(provider: str) -> bool:
    try:
        return issubclass(provider_class(provider), AnymailProvider)
    except LookupError:
        return False


# A `bounced` event's reject reason (an email receipt's error_code) -> the suppression it makes.
# The mailbox is gone or the address unusable: a hard bounce. The ESP refused because of an
# earlier complaint or unsubscribe of its own: that. Anything else (its policy, repeated
# temporary failures, Mailgun's `generic`): nothing is known to be wrong with the address.
BOUNCE_REASONS: dict[str, str] = {
    "": SuppressionReason.HARD_BOUNCE,  # no reason given: anymail's `bounced` is a hard bounce
    RejectReason.BOUNCED: SuppressionReason.HARD_BOUNCE,
    RejectReason.INVALID: SuppressionReason.HARD_BOUNCE,
    RejectReason.SPAM: SuppressionReason.COMPLAINT,
    RejectReason.UNSUBSCRIBED: SuppressionReason.UNSUBSCRIBED,
}


def suppressing_event(provider: str, provider_status: str, error_code: str = "") -> str | None:
    """The suppression reason an applied receipt makes, if any (only an anymail ESP's events)."""
    reason = EVENT_REASONS.get(provider_status)
    if reason == SuppressionReason.HARD_BOUNCE:
        reason = BOUNCE_REASONS.get(error_code)
    return reason if reason is not None and _is_esp(provider) else None


def suppressions_from_events(events: Iterable[tuple[Any, str, str, str]]) -> int:
    """Suppress for (message id, provider, provider_status, error_code) of matched receipts;
    returns how many suppressions were new. One query for the messages and one for their clients,
    only when some event suppresses (a campaign's `delivered` receipts cost nothing here)."""
    wanted = [
        (pk, provider, status, reason)
        for pk, provider, status, error_code in events
        if (reason := suppressing_event(provider, status, error_code))
    ]
    if not wanted:
        return 0
    messages = Message.objects.only("id", "client_id", "channel", "to", "fallback_to", "category", "priority").in_bulk(
        [pk for pk, _, _, _ in wanted]
    )
    clients = ApiClient.objects.in_bulk({message.client_id for message in messages.values()})
    created = 0
    for pk, provider, status, reason in wanted:
        message = messages.get(pk)
        if message is None:
            continue
        address = message.to if message.channel == Channel.EMAIL else message.fallback_to.get(Channel.EMAIL)
        if not address:
            continue
        scope = ""
        if reason == SuppressionReason.UNSUBSCRIBED:
            # The ESP's unsubscribe of a list email covers that list, as its one-click link does.
            scope = list_unsubscribe_scope(category=message.category, priority=message.priority) or ""
        try:
            with transaction.atomic():  # a failure here must not undo (and so stall) the receipt batch
                _, new = suppression_add(
                    client=clients[message.client_id],
                    channel=Channel.EMAIL,
                    address=address,
                    reason=reason,
                    scope=scope,
                    source=f"{provider} {status}",
                    note=f"message {message.pk}",
                )
        except Exception:
            logger.exception("could not suppress after a %s event for message %s", provider, message.pk)
            continue
        created += new
    return created
