"""Callback endpoints and outbox rows written directly, for tests of what reads and replays them
(the outbox writer and the deliverer have their own tests)."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.utils import timezone

from messaging.callbacks.endpoints import callback_endpoint_create
from messaging.models import ApiClient, Callback, CallbackEndpoint, Message


def endpoint_make(client: ApiClient, url: str = "https://hooks.example.com/conductor", **fields) -> CallbackEndpoint:
    endpoint, _ = callback_endpoint_create(client=client, url=url)
    if fields:
        CallbackEndpoint.objects.filter(pk=endpoint.pk).update(**fields)
        endpoint.refresh_from_db()
    return endpoint


def callback_make(
    message: Message,
    endpoint: CallbackEndpoint,
    *,
    sequence: int = 1,
    event: str = "accepted",
    state: str = "pending",
    attempt_log: list | None = None,
    last_error: str = "",
    created_at: datetime | None = None,
    **fields,
) -> Callback:
    now = created_at or timezone.now()
    return Callback.objects.create(
        webhook_id="msg_" + uuid.uuid4().hex,
        endpoint=endpoint,
        message=message,
        event=event,
        sequence=sequence,
        occurred_at=now,
        payload={
            "type": f"message.{event}",
            "timestamp": now.isoformat(),
            "data": {"message_id": str(message.pk), "event": event, "sequence": sequence},
        },
        state=state,
        attempts=len(attempt_log or []),
        attempt_log=attempt_log or [],
        next_attempt_at=now,
        created_at=now,
        last_error=last_error,
        **fields,
    )
