"""Reads for messages and dead letters: what a client may see, what an operator selects."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Prefetch, Q, QuerySet

from messaging.models import (
    ApiClient,
    ApiKey,
    Callback,
    CallbackEndpoint,
    DeadLetter,
    DispatchAttempt,
    Message,
    MessageEvent,
)


def messages_for_client(*, client: ApiClient) -> QuerySet[Message]:
    return Message.objects.filter(client=client)


def message_detail_for_client(*, client: ApiClient) -> QuerySet[Message]:
    return messages_for_client(client=client).prefetch_related(
        Prefetch("attempts", queryset=DispatchAttempt.objects.order_by("number", "id")),
        Prefetch("events", queryset=MessageEvent.objects.order_by("created_at", "id")),
        "receipts",
        Prefetch("callbacks", queryset=Callback.objects.select_related("endpoint").order_by("sequence", "endpoint_id")),
    )


def callback_endpoints_for_client(*, client: ApiClient) -> QuerySet[CallbackEndpoint]:
    return CallbackEndpoint.objects.filter(client=client)


def api_key_active(*, key_hash: str) -> ApiKey | None:
    return ApiKey.objects.select_related("client").filter(key_hash=key_hash, is_active=True).first()


@dataclass(frozen=True)
class DeadLetterCriteria:
    """Which dead letters to list or replay; every field narrows, empty means any.

    `ids` holds dead-letter ids (numbers) and message ids (UUIDs) alike: operators find either in
    logs, alerts and the admin.
    """

    client: ApiClient | None = None  # the API's scope: a client sees only its own
    client_names: tuple[str, ...] = ()  # an operator's filter
    since: datetime | None = None
    until: datetime | None = None
    channels: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()
    error_types: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    priorities: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    ids: tuple[int | uuid.UUID, ...] = ()
    kinds: tuple[str, ...] = ()  # DeadLetterKind: message, callback
    endpoints: tuple[int, ...] = ()  # callback dead letters of these callback endpoints
    parked: bool | None = None  # True: not replayed yet; False: replayed; None: both

    def narrows(self) -> bool:
        """Whether anything but the client and the parked flag was given (an empty replay filter
        would replay a whole queue: callers ask for an explicit "all" instead)."""
        narrowing = (self.since, self.until, self.channels, self.providers, self.error_types, self.categories)
        return any((*narrowing, self.priorities, self.states, self.ids, self.client_names, self.kinds, self.endpoints))


def dead_letters_matching(*, criteria: DeadLetterCriteria) -> QuerySet[DeadLetter]:
    """Dead letters meeting every criterion, oldest first (the order replays go in)."""
    rows = DeadLetter.objects.all()
    if criteria.client is not None:
        rows = rows.filter(client=criteria.client)
    if criteria.since is not None:
        rows = rows.filter(created_at__gte=criteria.since)
    if criteria.until is not None:
        rows = rows.filter(created_at__lt=criteria.until)
    for column, values in (
        ("client__name", criteria.client_names),
        ("channel", criteria.channels),
        ("provider", criteria.providers),
        ("error_type", criteria.error_types),
        ("category", criteria.categories),
        ("priority", criteria.priorities),
        ("state", criteria.states),
        ("kind", criteria.kinds),
        ("callback__endpoint_id", criteria.endpoints),
    ):
        if values:
            rows = rows.filter(**{f"{column}__in": values})
    if criteria.ids:
        numbers = [i for i in criteria.ids if isinstance(i, int)]
        uuids = [i for i in criteria.ids if isinstance(i, uuid.UUID)]
        rows = rows.filter(Q(pk__in=numbers) | Q(message_id__in=uuids))
    if criteria.parked is not None:
        rows = rows.filter(replayed_at__isnull=criteria.parked)
    return rows.order_by("created_at", "pk")


def dead_letter_detail_for_client(*, client: ApiClient) -> QuerySet[DeadLetter]:
    return DeadLetter.objects.filter(client=client).select_related("callback__endpoint")
