"""Store provider receipts once each and apply them to messages through the transition service
(from our receipt webhook view, anymail's tracking signal, polling and reconciliation)."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from anymail.signals import AnymailTrackingEvent, tracking
from django.db import IntegrityError, transaction
from django.dispatch import receiver
from django.utils import timezone

from messaging.models import ErrorType, EventSource, Message, Receipt
from messaging.services import message_transition
from messaging.states import MessageState
from providers.mailgun import AnymailProvider
from providers.types import ReceiptEvent

logger = logging.getLogger(__name__)


def _find_message(event: ReceiptEvent) -> Message | None:
    if event.message_id:
        try:
            message = Message.objects.filter(pk=uuid.UUID(event.message_id)).first()
        except ValueError:
            message = None
        if message is not None:
            return message
    if event.provider_message_id:
        return Message.objects.filter(provider=event.provider, provider_message_id=event.provider_message_id).first()
    return None


def receipt_record(*, event: ReceiptEvent, source: str = EventSource.WEBHOOK) -> tuple[Receipt, bool]:
    """Store the receipt (deduplicated on the provider's event id) and apply it.

    Returns the receipt and whether it was new. A receipt for a message we do not know is kept
    unmatched; one that arrives before our own "dispatched" write is applied all the same.
    """
    message = _find_message(event)
    try:
        with transaction.atomic():
            receipt = Receipt.objects.create(
                provider=event.provider,
                event_id=event.event_id,
                message=message,
                provider_message_id=event.provider_message_id,
                provider_status=event.provider_status,
                mapped_state=event.state or "",
                error_code=event.error_code,
                source=source,
                received_at=timezone.now(),
                payload=event.payload,
            )
    except IntegrityError:
        logger.info("duplicate %s receipt %s ignored", event.provider, event.event_id)
        return Receipt.objects.get(provider=event.provider, event_id=event.event_id), False
    if message is None:
        logger.warning(
            "unmatched %s receipt for %s (%s)", event.provider, event.provider_message_id, event.provider_status
        )
        return receipt, True
    receipt_apply(receipt=receipt, message=message, source=source)
    return receipt, True


def receipt_apply(*, receipt: Receipt, message: Message, source: str) -> bool:
    """Apply a stored receipt to its message (linking it first if it was unmatched).

    Returns whether the message's state moved. The transition service decides: a receipt that
    would move a message backwards is kept, not applied.
    """
    if receipt.message_id is None:
        Receipt.objects.filter(pk=receipt.pk).update(message=message)
        receipt.message = message
    state = receipt.mapped_state
    if not state or state == message.state:
        return False
    fields = {}
    if not message.provider_message_id:
        fields = {"provider": receipt.provider, "provider_message_id": receipt.provider_message_id}
    if state == MessageState.FAILED:
        # The provider took it, then gave up for good: the dead letter says so.
        fields |= {
            "last_error_type": ErrorType.REJECTED,
            "last_error_code": receipt.error_code,
            "last_error_message": f"{receipt.provider} reported {receipt.provider_status} after accepting it",
        }
    applied = message_transition(
        message_id=message.pk,
        to_state=state,
        source=source,
        detail=f"{receipt.provider} receipt: {receipt.provider_status}"
        + (f" (error {receipt.error_code})" if receipt.error_code else ""),
        fields=fields,
    )
    if applied:
        Receipt.objects.filter(pk=receipt.pk).update(applied=True)
        receipt.applied = True
    return applied


@receiver(tracking, dispatch_uid="messaging.receipts.record_tracking_event")
def record_tracking_event(sender: type, event: AnymailTrackingEvent, esp_name: str, **kwargs: Any) -> None:
    """anymail's tracking webhooks (signature already checked by anymail) -> stored, applied receipts."""
    provider = AnymailProvider.for_esp(esp_name)
    if provider is None:
        logger.warning("tracking event from %s ignored: no Conductor provider for that ESP", esp_name)
        return
    receipt_record(event=provider.receipt_event(event), source=EventSource.WEBHOOK)
