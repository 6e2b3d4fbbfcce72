"""Parking a message in the dead letter queue with the full context an operator needs.

Called by the transition service inside its transaction whenever a message enters failed, expired
or dead_lettered, so no path that gives up on a message can forget to park it. Replay lives in
messaging.replay; deleting past retention in reconciliation.retention.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from messaging.logging import masked
from messaging.models import UNKNOWN_OUTCOMES, DeadLetter, DispatchAttempt, ErrorType, Message

logger = logging.getLogger(__name__)

ATTEMPT_FIELDS = (
    "number",
    "send_generation",
    "provider",
    "channel",
    "note",
    "started_at",
    "ended_at",
    "outcome",
    "error_type",
    "error_code",
    "error_message",
    "latency_ms",
    "provider_message_id",
)


def message_payload(message: Message) -> dict[str, Any]:
    """The message as its sender gave it (after validation), to show and to replay from."""
    return {
        "id": str(message.pk),
        "client": message.client_id,
        "channel": message.channel,
        "to": message.to,
        "subject": message.subject,
        "body": message.body,
        "priority": message.priority,
        "category": message.category,
        "idempotency_key": message.idempotency_key,
        "ordering_key": message.ordering_key,
        "expires_at": message.expires_at,
        "deadline_from_sender": message.deadline_from_sender,
        "fallback_channels": message.fallback_channels,
        "fallback_to": message.fallback_to,
        "metadata": message.metadata,
        "created_at": message.created_at,
    }


def dead_letter_park(*, message_id: Any, reason: str, parked_at: datetime) -> DeadLetter:
    """Record the dead letter of the message's current generation; the caller holds the transaction
    in which the message just entered a dead-letter state."""
    message = Message.objects.get(pk=message_id)
    attempts = list(
        DispatchAttempt.objects.filter(message_id=message_id).order_by("number", "id").values(*ATTEMPT_FIELDS)
    )
    last_outcome = attempts[-1]["outcome"] if attempts else ""
    dead_letter = DeadLetter.objects.create(
        message=message,
        client_id=message.client_id,
        send_generation=message.send_generation,
        state=message.state,
        channel=message.channel,
        priority=message.priority,
        category=message.category,
        provider=message.provider,
        error_type=message.last_error_type or ErrorType.UNKNOWN,
        error_code=message.last_error_code,
        error_message=message.last_error_message,
        reason=reason[:2000],
        unknown_outcome=message.needs_provider_lookup or last_outcome in UNKNOWN_OUTCOMES,
        payload=message_payload(message),
        attempts=attempts,
        created_at=parked_at,
    )
    logger.info(
        "message %s parked as dead letter %s: %s to %s, %s (%s)",
        message.pk,
        dead_letter.pk,
        message.channel,
        masked(message.to),
        dead_letter.error_type,
        message.state,
    )
    return dead_letter
