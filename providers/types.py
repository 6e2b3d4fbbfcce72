"""The providers layer's vocabulary: why a send failed, what a receipt reports, the three kinds
of provider error, and the values a send, a look-up and a receipt come back as."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import models


class ErrorType(models.TextChoices):
    """Why a send failed: the one vocabulary of attempts, dead letters, metrics and replay filters.

    ERROR_TYPE_MEANINGS below says what each means for an operator deciding whether to replay.
    """

    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_5XX = "provider_5xx"
    RATE_LIMITED = "rate_limited"
    CONNECTION_ERROR = "connection_error"
    PROVIDER_AUTH = "provider_auth"
    INVALID_RECIPIENT = "invalid_recipient"
    REJECTED = "rejected"
    CIRCUIT_OPEN = "circuit_open"
    WORKER_LOST = "worker_lost"
    EXPIRED = "expired"
    NO_ROUTE = "no_route"
    OPTED_OUT = "opted_out"
    SUPPRESSED = "suppressed"
    OUTSIDE_SESSION_WINDOW = "outside_session_window"
    UNKNOWN = "unknown"


ERROR_TYPE_MEANINGS: dict[str, str] = {
    ErrorType.PROVIDER_TIMEOUT: "no answer in time; the provider may have taken it (looked up before any resend)",
    ErrorType.PROVIDER_5XX: "the provider answered with a server error (5xx)",
    ErrorType.RATE_LIMITED: "the provider refused for rate (429); Retry-After was honoured",
    ErrorType.CONNECTION_ERROR: "the provider could not be reached (refused, reset, DNS)",
    ErrorType.PROVIDER_AUTH: "the provider refused our credentials or account (fix settings, then replay)",
    ErrorType.INVALID_RECIPIENT: "the provider says the number or address cannot receive (a replay fails again)",
    ErrorType.REJECTED: "the provider refused or failed this message for another permanent reason",
    ErrorType.CIRCUIT_OPEN: "every provider of the route was skipped by its open circuit breaker",
    ErrorType.WORKER_LOST: "the worker sending it died repeatedly (CONDUCTOR_MAX_WORKER_LOSSES)",
    ErrorType.EXPIRED: "its deadline passed before it could be sent",
    ErrorType.NO_ROUTE: "no provider is configured for its channel",
    ErrorType.OPTED_OUT: "the provider says the recipient opted out (e.g. Twilio 21610); the address is now suppressed",
    ErrorType.SUPPRESSED: "the address is on the client's suppression list: never handed to a provider "
    "(a replay is refused until the suppression is lifted)",
    ErrorType.OUTSIDE_SESSION_WINDOW: "a free-form WhatsApp message outside the 24-hour window the recipient's "
    "last message opened (Twilio 63016): only an approved template may go; send one, or wait for them to write",
    ErrorType.UNKNOWN: "none of the above (see the error message)",
}


class ReportedState(models.TextChoices):
    """What a provider's status says of a message, in the lifecycle's own words (the values are
    messaging.states.MessageState's, so a status map needs no translation above this layer)."""

    DISPATCHED = "dispatched"
    DELIVERED = "delivered"
    READ = "read"
    UNDELIVERED = "undelivered"
    FAILED = "failed"


class ProviderError(Exception):
    """A send or look-up that did not succeed; `error_type` is an ErrorType."""

    def __init__(self, message: str, *, error_type: str, code: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.code = code
        self.retry_after = retry_after


class TransientProviderError(ProviderError):
    """The provider did not take the message and may later: retry with backoff."""


class PermanentProviderError(ProviderError):
    """The provider will never take this message (bad number, unsubscribed, 4xx): fail it now."""


class DeadlineTooShortError(TransientProviderError):
    """Not sent: the time left before the message's deadline is below the provider's shortest
    validity (providers.base.Provider.validity_seconds). Nothing reached the provider; another
    hop may still take it, and a message no hop can take in time expires (docs/deadlines.md)."""

    def __init__(self, message: str):
        super().__init__(message, error_type=ErrorType.EXPIRED, code="below_minimum_validity")


class AmbiguousProviderError(ProviderError):
    """The request may have reached the provider (timeout after sending): look it up, never blind-resend."""


class WebhookSignatureError(Exception):
    """A receipt webhook whose signature is missing or wrong: refuse it and change nothing."""


class WebhookReplayError(WebhookSignatureError):
    """A rightly signed receipt webhook that is stale, dated ahead, or whose one-time token was seen
    before: a replay (refuse it, 403, change nothing)."""


class InboundNotSupported(Exception):
    """The provider has no inbound message webhook here (only Twilio's and Vonage's are taken)."""


class WebhookStateUnavailable(Exception):
    """The shared state that tells a replayed webhook from a new one (Redis) did not answer: refuse
    with a 503 so that the provider retries, rather than take a webhook that may be a replay."""


@dataclass(frozen=True)
class SendRequest:
    message_id: str
    token: str  # the same for every retry of one logical send
    channel: str
    to: str
    body: str
    subject: str = ""
    attempted_since: datetime | None = None  # first attempt of this generation, for look-ups
    # Extra email headers (List-Unsubscribe, RFC 8058), filled by the layer above; an email
    # provider sends them as they are, an SMS provider ignores them.
    headers: dict[str, str] = field(default_factory=dict, hash=False)
    # The message's deadline: an adapter passes the time left to the provider's own expiry field
    # (Twilio ValidityPeriod, Vonage ttl) so that the provider does not deliver it late either.
    expires_at: datetime | None = None
    # A WhatsApp template (Twilio Content SID) and its variables, sent instead of the body.
    template: str = ""
    template_variables: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class SendResult:
    provider_message_id: str
    provider_status: str


@dataclass(frozen=True)
class StatusResult:
    provider_message_id: str
    provider_status: str
    state: str | None  # our MessageState, or None when the status says nothing new


# The longest value each text field of a receipt may have (the receipt table's columns,
# messaging.models.Receipt): a webhook with a longer one is refused (400 naming the field).
RECEIPT_FIELD_MAX_LENGTHS: dict[str, int] = {
    "provider_message_id": 128,
    "provider_status": 64,
    "error_code": 64,
    "event_id": 200,  # last: often made of the two above, which name the cause better
}


@dataclass(frozen=True)
class ReceiptEvent:
    """A provider's status report, normalised."""

    provider: str
    event_id: str
    provider_message_id: str
    provider_status: str
    state: str | None
    message_id: str | None = None  # ours, when the provider echoes our reference
    error_code: str = ""
    payload: dict[str, Any] = field(default_factory=dict)


# The longest value each field of an inbound message may have (messaging.models.InboundMessage's
# columns): a webhook with a longer one is refused (400 naming the field).
INBOUND_FIELD_MAX_LENGTHS: dict[str, int] = {
    "provider_message_id": 128,
    "from_": 64,
    "to": 64,
}


@dataclass(frozen=True)
class InboundMessage:
    """A message a recipient sent to one of our numbers (an inbound SMS or WhatsApp), normalised:
    `from_` and `to` in E.164 when they are phone numbers (the channel's prefix dropped)."""

    provider: str
    channel: str
    from_: str
    to: str
    body: str
    provider_message_id: str
