"""The provider interface every adapter implements (its vocabulary is in providers.types)."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from django.http import HttpRequest

from providers.types import ReceiptEvent, SendRequest, SendResult, StatusResult


class Provider(ABC):
    """One provider: send, verify and parse its receipts, look up a message's status."""

    name: ClassVar[str]
    channels: ClassVar[frozenset[str]]
    # Provider status vocabulary -> our MessageState (None: no change worth recording).
    status_map: ClassVar[dict[str, str | None]]
    # Whether the provider reports delivery (receipts, status look-ups); SMTP does not.
    has_receipts: ClassVar[bool] = True
    # Whether find_send can tell if an ambiguous send was accepted; without it such a message
    # is dead-lettered for an operator to decide, never resent blindly.
    supports_lookup: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any]):
        self.config = config

    @abstractmethod
    def send(self, request: SendRequest) -> SendResult:
        """Hand one message to the provider; raise one of the three ProviderErrors on failure."""

    async def send_async(self, request: SendRequest) -> SendResult:
        """send() for a caller that makes many at once on an event loop (the bulk path). By
        default the blocking send in the loop's thread pool; an adapter whose SDK has an async
        client overrides it (same errors, same rules)."""
        return await asyncio.get_running_loop().run_in_executor(None, self.send, request)

    def close(self) -> None:
        """Release connections the adapter holds (its pools live as long as the process otherwise)."""
        return None  # nothing held by default

    @abstractmethod
    def parse_webhook(self, request: HttpRequest) -> list[ReceiptEvent]:
        """Verify the request's signature (raise WebhookSignatureError) and normalise its events."""

    @abstractmethod
    def fetch_status(self, provider_message_id: str) -> StatusResult:
        """The provider's current status of one message, for reconciliation."""

    @abstractmethod
    def find_send(self, request: SendRequest) -> list[SendResult]:
        """What the provider accepted that matches this send (after an ambiguous outcome).

        Where the provider has no idempotency key this is a search, so it returns every
        candidate; the caller discards those already attributed to another message. An empty
        list means the provider positively has no record: only then may it be resent.
        """

    def map_status(self, provider_status: str) -> str | None:
        return self.status_map.get(provider_status)
