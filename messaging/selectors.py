"""Reads for messages: what a client may see."""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from messaging.models import ApiClient, ApiKey, DispatchAttempt, Message, MessageEvent


def messages_for_client(*, client: ApiClient) -> QuerySet[Message]:
    return Message.objects.filter(client=client)


def message_detail_for_client(*, client: ApiClient) -> QuerySet[Message]:
    return messages_for_client(client=client).prefetch_related(
        Prefetch("attempts", queryset=DispatchAttempt.objects.order_by("number", "id")),
        Prefetch("events", queryset=MessageEvent.objects.order_by("created_at", "id")),
        "receipts",
    )


def api_key_active(*, key_hash: str) -> ApiKey | None:
    return ApiKey.objects.select_related("client").filter(key_hash=key_hash, is_active=True).first()
