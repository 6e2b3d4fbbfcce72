"""The provider base class: it runs the send flow and the webhook flow once, as anymail's base does;
an adapter supplies only the provider-specific hooks (its vocabulary is in providers.types)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any, ClassVar, NoReturn, final

from django.http import HttpRequest
from django.utils import timezone

from providers.classify import TRANSPORT_ERRORS, classify_transport
from providers.types import (
    INBOUND_FIELD_MAX_LENGTHS,
    RECEIPT_FIELD_MAX_LENGTHS,
    AmbiguousProviderError,
    DeadlineTooShortError,
    ErrorType,
    InboundMessage,
    InboundNotSupported,
    ProviderError,
    ReceiptEvent,
    SendRequest,
    SendResult,
    StatusResult,
)


class _Required:
    """The default of a settings key the provider's CONDUCTOR_PROVIDERS entry must set."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

# Keys every CONDUCTOR_PROVIDERS entry may set -> default; checked at start-up (conductor.E019/E020).
SHARED_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "TIMEOUT_SECONDS": REQUIRED,
        # Messages per second across every worker (None: unlimited).
        "RATE_LIMIT_PER_SECOND": None,
        # A burst of 1 spaces sends evenly: what a provider's "N messages per second" cap checks.
        "RATE_LIMIT_BURST": 1,
        "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS": 1.0,
        # Overrides of providers.circuit.CircuitSettings for this provider.
        "CIRCUIT_BREAKER": {},
        # After an ambiguous send, how long an empty look-up is not yet trusted (records lag).
        "LOOKUP_SETTLE_SECONDS": 0.0,
        # How long the provider may still report a final status; after it, delivery is unknown.
        "RECEIPT_HORIZON_SECONDS": 72 * 3600.0,
    }
)


class Provider(ABC):
    """One provider: send, verify and parse its receipts, look up a message's status.

    Sending: send() and send_async() call prepare(), then transmit() (or transmit_async()), and
    sort any failure with classify_failure(): the adapter's classify_error() for its SDK's errors
    (which carry the provider's answer), then the shared transport rules. Receipts:
    parse_webhook() calls verify(), then parse(). Inbound messages (a recipient's STOP, HELP):
    parse_inbound_webhook() calls verify(), then parse_inbound(), which adapters taking inbound
    messages implement.
    """

    name: ClassVar[str]
    channels: ClassVar[frozenset[str]]
    # Provider status vocabulary -> our MessageState (None: no change worth recording).
    status_map: ClassVar[dict[str, str | None]]
    # The provider's error codes -> ErrorType of a permanent refusal (any other code: REJECTED).
    error_code_types: ClassVar[Mapping[Any, str]] = {}
    # A failed receipt's error code (text, as receipts carry it) -> ErrorType (any other: REJECTED).
    receipt_error_types: ClassVar[Mapping[str, str]] = {}
    # Errors that mean "an answer we could not read": it may have been accepted (ambiguous).
    unreadable_errors: ClassVar[tuple[type[BaseException], ...]] = ()
    # The provider's own CONDUCTOR_PROVIDERS keys -> default (REQUIRED: no default).
    own_settings: ClassVar[Mapping[str, Any]] = {}
    # SHARED_SETTINGS and own_settings together, made once per class.
    settings_schema: ClassVar[Mapping[str, Any]] = SHARED_SETTINGS
    # Whether the provider reports delivery (receipts, status look-ups); SMTP does not.
    has_receipts: ClassVar[bool] = True
    # Whether find_send can tell if an ambiguous send was accepted; without it such a message
    # is dead-lettered for an operator to decide, never resent blindly.
    supports_lookup: ClassVar[bool] = True
    # Whether a reply to an inbound message goes back in the inbound webhook's answer (Twilio's
    # TwiML, inbound_answer()); otherwise a reply is a message of its own, sent through Conductor.
    replies_in_answer: ClassVar[bool] = False
    # The provider's own expiry field as (shortest, longest) whole seconds it takes, or None when
    # it has none (email): prepare() passes the time left before the message's deadline there, so
    # the provider does not deliver it late either; a message with less time left than the
    # shortest is not handed to it (messaging.dispatch skips the hop). docs/deadlines.md.
    validity_seconds: ClassVar[tuple[int, int] | None] = None
    _has_async_transport: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if any(flow in cls.__dict__ for flow in ("parse_webhook", "parse_inbound_webhook", "send", "send_async")):
            raise TypeError(f"{cls.__name__} overrides a flow the base runs; supply its hooks instead")
        cls.settings_schema = MappingProxyType({**SHARED_SETTINGS, **cls.own_settings})
        cls._has_async_transport = cls.transmit_async is not Provider.transmit_async

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def setting(self, key: str) -> Any:
        """A key of this adapter's settings block, or its declared default (undeclared: KeyError)."""
        return self.setting_of(self.config, key)

    @classmethod
    def setting_of(cls, config: Mapping[str, Any], key: str) -> Any:
        if key not in cls.settings_schema:
            raise KeyError(f"{key!r} is not a setting of provider {cls.name!r}")
        value = config.get(key, cls.settings_schema[key])
        if value is REQUIRED:
            raise KeyError(f"CONDUCTOR_PROVIDERS[{cls.name!r}] has no {key!r}")
        return value

    # --- the send flow ------------------------------------------------------------------------
    @final
    def send(self, request: SendRequest) -> SendResult:
        """Hand one message to the provider; raise one of the three ProviderErrors on failure."""
        prepared = self.prepare(request)
        try:
            return self.transmit(prepared)
        except Exception as exc:
            self.raise_classified(exc)

    @final
    async def send_async(self, request: SendRequest) -> SendResult:
        """send() for a caller that makes many at once on an event loop (the bulk path): through the
        adapter's transmit_async() if it has an async client, else the blocking send in the loop's
        thread pool (same errors, same rules)."""
        if not self._has_async_transport:
            return await asyncio.get_running_loop().run_in_executor(None, self.send, request)
        prepared = self.prepare(request)
        try:
            return await self.transmit_async(prepared)
        except Exception as exc:
            self.raise_classified(exc)

    @abstractmethod
    def prepare(self, request: SendRequest) -> Any:
        """The provider's request for this message (its payload): what transmit() sends."""

    def validity_left(self, request: SendRequest, *, now: datetime | None = None) -> timedelta | None:
        """The time left before the request's deadline, `now` (default: this moment), capped at the
        provider's longest validity: what its expiry field is given, which the adapter rounds down
        to the field's unit (never more time than we have). None when the provider has no such
        field or the message no deadline. DeadlineTooShortError when less is left than the
        provider's shortest validity: it must not be handed over."""
        if self.validity_seconds is None or request.expires_at is None:
            return None
        shortest, longest = self.validity_seconds
        left = request.expires_at - (now or timezone.now())
        if left < timedelta(seconds=shortest):
            raise DeadlineTooShortError(validity_too_short(self.name, shortest, left))
        return min(left, timedelta(seconds=longest))

    @abstractmethod
    def transmit(self, prepared: Any) -> SendResult:
        """Send prepare()'s request and read the answer; raise whatever the client raises."""

    async def transmit_async(self, prepared: Any) -> SendResult:
        """transmit() on an async client; an adapter that has one overrides this."""
        raise NotImplementedError

    def classify_error(self, exc: Exception) -> ProviderError | None:
        """The adapter's own errors (its SDK's, carrying the provider's answer) as ProviderErrors;
        None for the shared rules to sort."""
        return None

    def classify_failure(self, exc: Exception) -> Exception:
        """A failed call as one of the three ProviderErrors; anything else (a bug) unchanged."""
        if isinstance(exc, ProviderError):
            return exc
        error = self.classify_error(exc)
        if error is not None:
            return error
        if isinstance(exc, TRANSPORT_ERRORS):
            return classify_transport(exc)
        if isinstance(exc, self.unreadable_errors):
            # e.g. a 2xx we could not parse: it may have been accepted.
            return AmbiguousProviderError(str(exc), error_type=ErrorType.UNKNOWN)
        return exc  # a bug or a configuration error, not a provider error: let it raise

    def raise_classified(self, exc: Exception) -> NoReturn:
        """Raise classify_failure(exc), chained to exc (from an `except` block of a provider call)."""
        error = self.classify_failure(exc)
        if error is exc:
            raise exc
        raise error from exc

    def close(self) -> None:
        """Release connections the adapter holds (its pools live as long as the process otherwise)."""
        return None  # nothing held by default

    # --- the webhook flow ---------------------------------------------------------------------
    @final
    def parse_webhook(self, request: HttpRequest) -> list[ReceiptEvent]:
        """The request's receipts, only once its signature is verified (raise WebhookSignatureError),
        each one storable as it is (ValueError naming the field otherwise)."""
        self.verify(request)
        return [receipt_checked(event) for event in self.parse(request)]

    @abstractmethod
    def verify(self, request: HttpRequest) -> None:
        """Raise WebhookSignatureError unless the request is signed by the provider (compare in
        constant time); ValueError if it cannot even be read."""

    @abstractmethod
    def parse(self, request: HttpRequest) -> list[ReceiptEvent]:
        """The verified request's events, normalised (ValueError if unreadable)."""

    # --- inbound messages ---------------------------------------------------------------------
    @final
    def parse_inbound_webhook(self, request: HttpRequest) -> InboundMessage:
        """The message of an inbound webhook, only once its signature is verified (the receipts'
        verify(): WebhookSignatureError), storable as it is (ValueError naming the field);
        InboundNotSupported, before anything is read, for a provider that takes none."""
        if type(self).parse_inbound is Provider.parse_inbound:
            raise InboundNotSupported(f"provider {self.name!r} has no inbound message webhook")
        self.verify(request)
        return inbound_checked(self.parse_inbound(request))

    def parse_inbound(self, request: HttpRequest) -> InboundMessage:
        """The verified inbound webhook's message, normalised (ValueError if unreadable). Only
        adapters whose provider forwards the messages recipients send implement it."""
        raise InboundNotSupported(f"provider {self.name!r} has no inbound message webhook")

    def inbound_answer(self, reply: str) -> tuple[str, str]:
        """(content type, body) of the inbound webhook's answer that sends `reply` ("": none) back
        to the sender; only for a provider that replies_in_answer."""
        raise NotImplementedError(f"provider {self.name!r} takes no reply in its webhook's answer")

    # --- look-ups -----------------------------------------------------------------------------
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


def validity_too_short(provider: str, shortest: int, left: timedelta) -> str:
    """Why a message is not handed to a provider whose shortest validity is more than it has left."""
    return (
        f"{max(left.total_seconds(), 0.0):.1f}s left before its deadline, below {provider}'s minimum "
        f"validity of {shortest}s: not handed to it"
    )


def receipt_checked(event: ReceiptEvent) -> ReceiptEvent:
    """The event if it can be stored as it is, with its payload made storable; ValueError naming the
    field if not (a receipt table column is shorter, an id is not text, our message id no UUID).

    A payload is kept as sent except for what PostgreSQL's jsonb cannot hold: NUL characters and
    lone surrogates (from JSON escapes) become U+FFFD, NaN and infinities (Python's JSON reads them)
    become text, so a receipt never fails to store for them.
    """
    for name, limit in RECEIPT_FIELD_MAX_LENGTHS.items():
        value = getattr(event, name)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text, not {type(value).__name__}")
        if len(value) > limit:
            raise ValueError(f"{name} is {len(value)} characters long; at most {limit} are stored")
        if value != _storable_text(value):
            raise ValueError(f"{name} contains characters that cannot be stored (NUL or a lone surrogate)")
    if event.message_id is not None:
        if not isinstance(event.message_id, str):
            raise ValueError(f"message_id must be text, not {type(event.message_id).__name__}")
        try:
            uuid.UUID(event.message_id)
        except ValueError:
            raise ValueError(f"message_id {event.message_id[:64]!r} is not a Conductor message id (a UUID)") from None
    if not isinstance(event.payload, dict):
        raise ValueError(f"payload must be an object, not {type(event.payload).__name__}")
    payload = _storable(event.payload)
    return event if payload == event.payload else dataclasses.replace(event, payload=payload)


def inbound_checked(message: InboundMessage) -> InboundMessage:
    """The inbound message if it can be stored and read as it is; ValueError naming the field if
    not (a value that is not text, an id or address empty, longer than its column, or with
    characters PostgreSQL cannot hold)."""
    for name in ("provider_message_id", "from_", "to", "body"):
        value = getattr(message, name)
        if not isinstance(value, str):
            raise ValueError(f"{name.rstrip('_')} must be text, not {type(value).__name__}")
        limit = INBOUND_FIELD_MAX_LENGTHS.get(name)
        if limit is not None and len(value) > limit:
            raise ValueError(f"{name.rstrip('_')} is {len(value)} characters long; at most {limit} are stored")
        if name != "body" and value != _storable_text(value):  # the body is read, never stored
            raise ValueError(f"{name.rstrip('_')} contains characters that cannot be stored (NUL or a lone surrogate)")
    if not message.provider_message_id:
        raise ValueError("provider_message_id is empty")
    if not message.from_:
        raise ValueError("from is empty")
    return message


def _storable(value: Any) -> Any:
    """JSON data with every string as PostgreSQL's jsonb can hold it."""
    if isinstance(value, str):
        return _storable_text(value)
    if isinstance(value, dict):
        return {_storable_text(str(key)): _storable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _storable_text(text: str) -> str:
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "\ufffd").encode("utf-8", "surrogatepass").decode("utf-8", "replace")
