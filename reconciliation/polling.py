"""Receipt follow-up: ask the provider about dispatched messages whose receipt is overdue.

A receipt can be lost (a webhook that never came, a provider that drops callbacks). After
RECEIPT_TIMEOUT_SECONDS (per channel) a dispatched message is looked up with the provider's
fetch_status, in batches; what it says is stored as a receipt (source: poll) and applied
through the transition service. Past the provider's receipt horizon a message is marked as
delivery-unknown and counted, never left silently in `dispatched`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.logging import scrubbed
from messaging.models import EventSource, Message
from messaging.receipts import receipt_record
from messaging.states import MessageState
from providers.conf import configured_provider_names
from providers.registry import PROVIDER_CLASSES, get_provider, provider_class
from providers.types import ProviderError, ReceiptEvent, StatusResult
from reconciliation.conf import receipt_horizon_seconds, reconciliation_setting

logger = logging.getLogger(__name__)


@dataclass
class PollReport:
    polled: int = 0
    updated: int = 0
    still_pending: int = 0
    failed_lookups: int = 0
    marked_unknown: int = 0


def receipt_providers() -> list[str]:
    """Configured providers that report delivery (SMTP does not: there is nothing to wait for)."""
    return [
        name for name in configured_provider_names() if name in PROVIDER_CLASSES and provider_class(name).has_receipts
    ]


def awaiting_receipt() -> Q:
    return Q(state=MessageState.DISPATCHED, receipt_unknown_at__isnull=True)


def receipts_poll_overdue(*, now: datetime | None = None, batch_size: int | None = None) -> PollReport:
    """One polling round: mark what is past its horizon, then look up one batch of overdue messages."""
    now = now or timezone.now()
    report = PollReport()
    providers = receipt_providers()
    for provider in providers:
        horizon = now - timedelta(seconds=receipt_horizon_seconds(provider))
        report.marked_unknown += Message.objects.filter(
            awaiting_receipt(), provider=provider, dispatched_at__lte=horizon
        ).update(receipt_unknown_at=now)
    if report.marked_unknown:
        logger.warning("%d dispatched messages passed their receipt horizon: delivery unknown", report.marked_unknown)
    for message in _claim_overdue(now, providers, batch_size or reconciliation_setting("RECEIPT_POLL_BATCH_SIZE")):
        outcome = receipt_poll_one(message=message)
        report.polled += 1
        if outcome == "updated":
            report.updated += 1
        elif outcome == "pending":
            report.still_pending += 1
        else:
            report.failed_lookups += 1
    if report.polled:
        logger.info(
            "receipt poll: %d polled, %d updated, %d still pending, %d look-ups failed",
            report.polled,
            report.updated,
            report.still_pending,
            report.failed_lookups,
        )
    return report


def _overdue(now: datetime, providers: list[str]) -> Q:
    repoll = now - timedelta(seconds=reconciliation_setting("RECEIPT_REPOLL_SECONDS"))
    by_channel = Q(pk__in=[])
    for channel, timeout in messaging_setting("RECEIPT_TIMEOUT_SECONDS").items():
        by_channel |= Q(channel=channel, dispatched_at__lte=now - timedelta(seconds=timeout))
    not_recently = Q(receipt_polled_at__isnull=True) | Q(receipt_polled_at__lte=repoll)
    return awaiting_receipt() & Q(provider__in=providers) & ~Q(provider_message_id="") & by_channel & not_recently


def _claim_overdue(now: datetime, providers: list[str], batch_size: int) -> list[Message]:
    """The oldest overdue messages, marked polled in one transaction: a concurrent round skips them."""
    with transaction.atomic():
        ids = list(
            Message.objects.filter(_overdue(now, providers))
            .order_by("dispatched_at")
            .select_for_update(skip_locked=True)
            .values_list("pk", flat=True)[:batch_size]
        )
        Message.objects.filter(pk__in=ids).update(receipt_polled_at=now)
    return list(Message.objects.filter(pk__in=ids).order_by("dispatched_at"))


def receipt_poll_one(*, message: Message) -> str:
    """Ask the message's provider for its status: "updated", "pending" or "failed" (the look-up)."""
    status = provider_status(message)
    if status is None:
        return "failed"
    return "updated" if receipt_from_status(message=message, status=status) else "pending"


def provider_status(message: Message) -> StatusResult | None:
    """The provider's current status of a sent message; None when it could not be asked."""
    try:
        return get_provider(message.provider).fetch_status(message.provider_message_id)
    except ProviderError as exc:
        logger.info("status look-up of message %s at %s failed: %s", message.pk, message.provider, scrubbed(str(exc)))
        return None


def receipt_from_status(*, message: Message, status: StatusResult) -> bool:
    """Store what a look-up said as a receipt (source: poll) and apply it; whether the state moved."""
    if status.state in (None, MessageState.DISPATCHED):
        return False
    event = ReceiptEvent(
        provider=message.provider,
        # One stored receipt per status a look-up reports, however often it is asked.
        event_id=f"poll:{message.provider_message_id}:{status.provider_status}",
        provider_message_id=message.provider_message_id,
        provider_status=status.provider_status,
        state=status.state,
        message_id=str(message.pk),
        payload={"polled_at": timezone.now().isoformat(), "status": status.provider_status},
    )
    receipt, _ = receipt_record(event=event, source=EventSource.POLL)
    return receipt.applied
