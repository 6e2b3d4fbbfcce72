"""Writes for messages and API keys: create (idempotent, through messaging.ingest), cancel, and the one
transition service (messaging.transitions, offered here too)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from typing import Any

from django.db.models import Q
from django.utils import timezone

from messaging.ingest import BatchItem, CreateOutcome, IdempotencyConflict, IdempotencyInFlight, messages_create_many
from messaging.limits import PriorityNotAllowed, QuotaExceeded
from messaging.models import ApiClient, ApiKey, EventSource, Message, unleased
from messaging.states import MessageState
from messaging.transitions import message_transition as message_transition
from messaging.transitions import messages_transition as messages_transition

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "cnd_"


# --- API keys ---------------------------------------------------------------------------------
def hash_api_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_create(*, client_name: str) -> tuple[ApiKey, str]:
    """Create a key (and its client if new); the raw key is returned once and never stored."""
    client, _ = ApiClient.objects.get_or_create(name=client_name)
    raw_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(client=client, prefix=raw_key[:12], key_hash=hash_api_key(raw_key))
    return key, raw_key


def api_key_revoke_all(*, client_name: str) -> int:
    return ApiKey.objects.filter(client__name=client_name, is_active=True).update(is_active=False)


# --- create -------------------------------------------------------------------------------------
def message_create(
    *, client: ApiClient, fields: dict[str, Any], idempotency_key: str | None, source: str = EventSource.API
) -> CreateOutcome:
    """Accept one validated message: a batch of one through messaging.ingest (stored, then
    published once committed). `fields` is the serializer's validated data without the key. The
    same key and payload returns the stored message (created=False); another payload raises
    IdempotencyConflict, a request with the key still in flight IdempotencyInFlight; a priority the
    client may not send PriorityNotAllowed, a spent daily quota QuotaExceeded (messaging.limits)."""
    [result] = messages_create_many(client=client, items=[BatchItem(fields, idempotency_key)], source=source)
    if isinstance(result, (IdempotencyConflict, IdempotencyInFlight, PriorityNotAllowed, QuotaExceeded)):
        raise result
    return result


# --- cancel ---------------------------------------------------------------------------
class NotCancellable(Exception):
    """The message was already handed to a worker or a provider (HTTP 409)."""


def message_cancel(*, message: Message, source: str = EventSource.API, actor: str = "the client") -> Message:
    """Cancel a message that no worker has started to send, or close one given up on before it
    was ever dispatched (it will not be replayed); otherwise raise NotCancellable."""
    now = timezone.now()
    never_dispatched = Q(state=MessageState.ACCEPTED) | Q(dispatched_at__isnull=True)
    applied = message_transition(
        message_id=message.pk,
        to_state=MessageState.CANCELLED,
        source=source,
        detail=f"cancelled by {actor}",
        fields={"next_attempt_at": None},
        extra_filter=unleased(now) & never_dispatched,
    )
    message.refresh_from_db()
    if not applied:
        raise NotCancellable(f"message is {message.state} and can no longer be cancelled")
    return message
