"""Mailgun email through django-anymail (on a base any anymail ESP can share): send, tracking
webhooks, Events API look-ups."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import requests
from anymail.exceptions import (
    AnymailConfigurationError,
    AnymailInvalidAddress,
    AnymailRecipientsRefused,
    AnymailRequestsAPIError,
    AnymailWebhookValidationFailure,
)
from anymail.message import AnymailMessage
from anymail.signals import AnymailTrackingEvent, EventType
from anymail.webhooks.base import AnymailCoreWebhookView
from anymail.webhooks.mailgun import MailgunTrackingWebhookView
from django.core.mail import get_connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from providers.base import REQUIRED, Provider, receipt_checked
from providers.classify import classify_status, classify_transport
from providers.conf import provider_config
from providers.http import AbortingHTTPAdapter
from providers.redact import scrubbed
from providers.types import (
    AmbiguousProviderError,
    ErrorType,
    PermanentProviderError,
    ProviderError,
    ReceiptEvent,
    ReportedState,
    SendRequest,
    SendResult,
    StatusResult,
    WebhookReplayError,
    WebhookSignatureError,
    WebhookStateUnavailable,
)
from providers.webhook_replay import webhook_token_claim, webhook_token_release

logger = logging.getLogger(__name__)

# Our message id and send token travel as anymail metadata (Mailgun: custom variables `v:…`).
MESSAGE_ID_VAR = "conductor_message_id"
TOKEN_VAR = "conductor_token"
# What anymail's parsing of an event raises when the event is not shaped as documented (it reads
# the ESP's JSON without checking types): such a webhook is unreadable (400), not our error (500).
UNREADABLE_EVENT_ERRORS = (AttributeError, LookupError, TypeError, ValueError, OverflowError, AnymailConfigurationError)
# The signature material of Mailgun's webhooks, never stored: the JSON format's `signature` object
# (timestamp, token, signature, parent-signature); the legacy form's `signature` and `token`.
SIGNATURE_FIELDS = frozenset({"signature", "token"})


class AnymailProvider(Provider):
    """Email through one anymail ESP backend: the sending, error sorting and webhook flow they share.

    A second ESP (say Postmark) is a subclass that sets `name`, `esp_name` (anymail's spelling,
    which the tracking signal carries), `backend` (anymail's backend path), `webhook_view`
    (anymail's tracking view for it) and `own_settings` (its settings keys); maps its settings
    block to the backend's and the view's keyword arguments in `backend_options()` and
    `webhook_options()`; says which 400 answer means a bad address in `is_invalid_recipient()`;
    and implements `fetch_status` and `find_send` against the ESP's own message-status API, which
    anymail does not wrap. If that ESP does not sign its webhooks, set ANYMAIL["WEBHOOK_SECRET"]
    (basic auth) too. Then a registry entry, a CONDUCTOR_PROVIDERS block, and a test module
    subclassing the provider contract.
    """

    channels = frozenset({"email"})
    esp_name: ClassVar[str]
    backend: ClassVar[str]
    webhook_view: ClassVar[type[AnymailCoreWebhookView]]
    # anymail's normalised tracking event types (anymail.signals.EventType) -> our MessageState.
    status_map = {
        EventType.QUEUED: ReportedState.DISPATCHED,
        EventType.SENT: ReportedState.DISPATCHED,
        EventType.DELIVERED: ReportedState.DELIVERED,
        EventType.OPENED: ReportedState.READ,
        EventType.CLICKED: ReportedState.READ,  # a click implies the message was opened
        EventType.BOUNCED: ReportedState.UNDELIVERED,
        EventType.REJECTED: ReportedState.FAILED,
        EventType.FAILED: ReportedState.FAILED,
        # Stored as receipts, but they say nothing about delivery.
        EventType.DEFERRED: None,
        EventType.AUTORESPONDED: None,
        EventType.COMPLAINED: None,
        EventType.UNSUBSCRIBED: None,
        EventType.SUBSCRIBED: None,
        EventType.UNKNOWN: None,
    }
    _by_esp: ClassVar[dict[str, type[AnymailProvider]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "esp_name" in cls.__dict__:
            AnymailProvider._by_esp[cls.esp_name] = cls

    @classmethod
    def for_esp(cls, esp_name: str) -> type[AnymailProvider] | None:
        """The adapter class for anymail's ESP name (as its signals send it), if we have one."""
        return cls._by_esp.get(esp_name)

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        # One backend per adapter instance, opened once and never closed: anymail then reuses its
        # requests session (and so its keep-alive connections) for every send.
        self.connection = get_connection(self.backend, **self.backend_options())
        self.connection.open()
        for prefix in ("http://", "https://"):  # a send given up on can no longer arrive later (providers.http)
            self.connection.session.mount(prefix, AbortingHTTPAdapter())
        # anymail has no stand-alone "verify and parse"; its view's own steps are that, so the
        # signature check and normalisation are exactly those of /webhooks/anymail/<esp>/tracking/.
        self.webhook = self.webhook_view(**self.webhook_options())

    # --- hooks each ESP fills in ------------------------------------------------------------------
    def backend_options(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must map its settings to anymail backend options")

    def webhook_options(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must map its settings to anymail webhook options")

    def is_invalid_recipient(self, response: requests.Response) -> bool:
        """Whether this error answer means a bad address (the ESP's error-code map, read from its text)."""
        raise NotImplementedError(f"{type(self).__name__} must say which error answers mean a bad address")

    # --- sending ------------------------------------------------------------------------------
    def prepare(self, request: SendRequest) -> AnymailMessage:
        return AnymailMessage(
            subject=request.subject,
            body=request.body,
            from_email=self.config["FROM_EMAIL"],
            to=[request.to],
            connection=self.connection,
            metadata={MESSAGE_ID_VAR: request.message_id, TOKEN_VAR: request.token},
            headers=dict(request.headers),  # Mailgun: `h:Name` fields
        )

    def transmit(self, prepared: AnymailMessage) -> SendResult:
        sent = prepared.send()
        status = prepared.anymail_status
        if not sent or not status.message_id:
            # Only a pre_send receiver cancelling it gets here: nothing left us.
            raise PermanentProviderError("send cancelled before it reached the ESP", error_type=ErrorType.REJECTED)
        return SendResult(provider_message_id=str(status.message_id), provider_status=",".join(sorted(status.status)))

    def classify_error(self, exc: Exception) -> ProviderError | None:
        if isinstance(exc, (AnymailRecipientsRefused, AnymailInvalidAddress)):
            return PermanentProviderError(str(exc), error_type=ErrorType.INVALID_RECIPIENT)
        if isinstance(exc, AnymailRequestsAPIError) and exc.response is not None:
            return self.classify_answer(exc.response, str(exc))
        if isinstance(exc, AnymailRequestsAPIError):
            # No response: anymail wrapped a requests error, which it chains as the cause.
            return classify_transport(exc.__cause__ or exc)
        return None  # other requests errors: the shared rules; anything else is a bug

    def classify_answer(self, response: requests.Response, text: str) -> ProviderError:
        refusal = ErrorType.INVALID_RECIPIENT if self.is_invalid_recipient(response) else ErrorType.REJECTED
        return classify_status(
            response.status_code, text, retry_after=response.headers.get("Retry-After"), refusal_type=refusal
        )

    # --- receipts -----------------------------------------------------------------------------
    def verify(self, request: HttpRequest) -> None:
        # anymail's validators compare the signature in constant time.
        try:
            self.webhook.run_validators(request)
        except AnymailWebhookValidationFailure as exc:
            raise WebhookSignatureError(str(exc)) from exc

    def parse(self, request: HttpRequest) -> list[ReceiptEvent]:
        try:
            events = self.webhook.parse_events(request)
            return [self.receipt_event(event) for event in events]
        except UNREADABLE_EVENT_ERRORS as exc:
            raise ValueError(f"unreadable {self.esp_name} tracking webhook: {exc}") from exc

    @classmethod
    def receipt_event(cls, event: AnymailTrackingEvent) -> ReceiptEvent:
        """Our receipt for one of anymail's normalised tracking events (ValueError naming what is
        wrong with it: the tracking signal's receiver stores exactly this)."""
        event_id = cls.event_id(event)
        if not event_id:
            raise ValueError(f"{cls.esp_name} tracking event without an id")
        metadata = event.metadata or {}
        if not isinstance(metadata, dict):
            raise ValueError(f"{cls.esp_name} event's custom variables are not an object")
        if not isinstance(event.message_id or "", str):
            raise ValueError(f"{cls.esp_name} event's message-id is not text")
        return receipt_checked(
            ReceiptEvent(
                provider=cls.name,
                event_id=event_id,
                provider_message_id=event.message_id or "",
                provider_status=event.event_type,
                state=cls.status_map.get(event.event_type),
                message_id=metadata.get(MESSAGE_ID_VAR) or None,
                error_code=event.reject_reason or "",
                payload=cls.stored_payload(event.esp_event),
            )
        )

    @classmethod
    def event_id(cls, event: AnymailTrackingEvent) -> str:
        return event.event_id or ""

    @classmethod
    def stored_payload(cls, esp_event: Any) -> dict[str, Any]:
        """The raw event as kept with the receipt: JSON-storable, without signature material."""
        return _plain(esp_event)


class MailgunTrackingView(MailgunTrackingWebhookView):
    """anymail's Mailgun tracking webhook (signature checked by anymail, events sent on its
    `tracking` signal), with what it lacks for Mailgun's scheme, whose signature covers a timestamp
    and a token but not the body:

    - replay protection: a signature older than WEBHOOK_MAX_AGE_SECONDS, or dated as far ahead, or
      whose token was taken before, is refused with 403 (nothing stored); tokens are kept in
      Redis, and while Redis does not answer every webhook is refused with 503 (Mailgun retries);
    - a webhook whose signature block or event is not shaped as documented gets 400 (anymail's
      parsing would raise a 500, which Mailgun retries for hours).

    Served at /webhooks/anymail/mailgun/tracking/ in place of anymail's own view, and used by
    MailgunProvider's verify() and parse() for /webhooks/mailgun/. A bad signature stays anymail's
    400 (SuspiciousOperation).
    """

    # Seconds a signature stays acceptable either way of our clock (an as_view() keyword, like
    # anymail's webhook_signing_key); None: the mailgun provider's WEBHOOK_MAX_AGE_SECONDS.
    max_age_seconds: float | None = None

    def __init__(self, **kwargs: Any):
        # Unless given, both from the mailgun provider's settings, as its adapter's own view: one
        # source for the key that the start-up checks see (not ANYMAIL's copy of it).
        if "webhook_signing_key" not in kwargs or kwargs.get("max_age_seconds") is None:
            config = provider_config("mailgun")
            kwargs.setdefault("webhook_signing_key", config["WEBHOOK_SIGNING_KEY"])
            if kwargs.get("max_age_seconds") is None:
                kwargs["max_age_seconds"] = MailgunProvider.setting_of(config, "WEBHOOK_MAX_AGE_SECONDS")
        super().__init__(**kwargs)

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        try:
            return super().post(request, *args, **kwargs)
        except WebhookReplayError as exc:
            logger.warning("refused Mailgun webhook: %s", exc)
            return JsonResponse({"detail": "stale or replayed signature"}, status=403)
        except WebhookStateUnavailable as exc:
            logger.error("refused Mailgun webhook for now: %s", exc)
            return JsonResponse({"detail": "cannot check for replays now; retry later"}, status=503)
        except UnreadableWebhook as exc:
            logger.warning("unreadable Mailgun webhook: %s", scrubbed(str(exc)))  # it may quote the payload
            return JsonResponse({"detail": f"unreadable Mailgun tracking webhook: {exc}"}, status=400)
        except BaseException:
            self.release(request)  # not taken: Mailgun's retry must not look like a replay
            raise

    def run_validators(self, request: HttpRequest) -> None:
        """anymail's checks (basic auth if set, the signature), then the replay checks: only a
        rightly signed token is ever claimed, so a forger cannot spend Mailgun's. A JSON body that
        is not an object is unreadable (UnreadableWebhook), not a bad signature."""
        if request.content_type == "application/json":
            try:
                body = json.loads(request.body.decode("utf-8"))
            except ValueError as exc:  # UnicodeDecodeError too
                raise UnreadableWebhook(f"body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise UnreadableWebhook(f"body is a JSON {type(body).__name__}, not an object")
        try:
            super().run_validators(request)
        except AnymailWebhookValidationFailure:
            raise
        except (AttributeError, LookupError, TypeError, ValueError) as exc:
            # anymail reads the signature block without checking its shape (a list, a non-ASCII token).
            raise AnymailWebhookValidationFailure(f"Mailgun webhook with an unreadable signature: {exc}") from exc
        timestamp, token = _signature_timestamp_and_token(request)
        request._conductor_webhook_claim = webhook_token_claim(  # type: ignore[attr-defined]
            provider="mailgun", token=token, timestamp=timestamp, max_age_seconds=self.max_age_seconds
        )

    def parse_events(self, request: HttpRequest) -> list[AnymailTrackingEvent]:
        """anymail's events, each one checked to make a storable receipt (UnreadableWebhook if not:
        its token is released then, so that Mailgun's retry is not taken for a replay)."""
        try:
            events = super().parse_events(request)
            for event in events:
                MailgunProvider.receipt_event(event)  # what the tracking signal's receiver stores
        except UNREADABLE_EVENT_ERRORS as exc:
            self.release(request)
            raise UnreadableWebhook(str(exc)) from exc
        return events

    @staticmethod
    def release(request: HttpRequest) -> None:
        key = getattr(request, "_conductor_webhook_claim", None)
        if key is not None:
            webhook_token_release(key)
            request._conductor_webhook_claim = None  # type: ignore[attr-defined]


class UnreadableWebhook(ValueError):
    """A rightly signed webhook whose event cannot be made into a receipt."""


def _signature_timestamp_and_token(request: HttpRequest) -> tuple[Any, Any]:
    """The timestamp and token anymail has just checked the signature of (read as anymail reads them)."""
    if request.content_type == "application/json":
        block = json.loads(request.body.decode("utf-8"))["signature"]
        return block["timestamp"], block["token"]
    return request.POST["timestamp"], request.POST["token"]  # the legacy form: last values, as anymail


class MailgunProvider(AnymailProvider):
    """Mailgun: anymail's backend and tracking webhook; look-ups through Mailgun's Events API."""

    name = "mailgun"
    esp_name = "Mailgun"
    backend = "anymail.backends.mailgun.EmailBackend"
    webhook_view = MailgunTrackingView
    API_ORIGIN = "https://api.mailgun.net"
    # Events API pages followed per look-up (300 events each) before we call the answer unknown.
    MAX_EVENT_PAGES = 20
    # Slack around our clock in Events API time ranges: Mailgun stamps events with its own.
    CLOCK_SLACK = timedelta(minutes=5)
    # The order in which a message's events say more: a later "accepted" must not hide "delivered".
    PROGRESS = {
        ReportedState.DISPATCHED: 1,
        ReportedState.DELIVERED: 2,
        ReportedState.UNDELIVERED: 2,
        ReportedState.FAILED: 2,
        ReportedState.READ: 3,
    }

    own_settings = {
        "API_KEY": REQUIRED,
        "DOMAIN": REQUIRED,
        "WEBHOOK_SIGNING_KEY": REQUIRED,
        "FROM_EMAIL": REQUIRED,
        "BASE_URL": "",  # empty: Mailgun itself
        # A tracking webhook signed longer ago than this (or dated as far ahead) is refused, and
        # each signature token is taken once within it (Mailgun signs timestamp + token only).
        "WEBHOOK_MAX_AGE_SECONDS": 300.0,
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.events_url = f"{self.api_origin}/v3/{quote(config['DOMAIN'], safe='')}/events"
        self.session = requests.Session()  # Events API look-ups; keep-alive across polls
        self.session.auth = ("api", config["API_KEY"])

    @property
    def api_origin(self) -> str:
        return (self.setting("BASE_URL") or self.API_ORIGIN).rstrip("/")

    def backend_options(self) -> dict[str, Any]:
        # Passed explicitly (over settings.ANYMAIL) so that an adapter built from another config
        # block, e.g. at another base URL, really talks to that URL.
        return {
            "api_key": self.config["API_KEY"],
            "sender_domain": self.config["DOMAIN"],
            "api_url": f"{self.api_origin}/v3",
            "timeout": self.config["TIMEOUT_SECONDS"],
        }

    def webhook_options(self) -> dict[str, Any]:
        return {
            "webhook_signing_key": self.config["WEBHOOK_SIGNING_KEY"],
            "max_age_seconds": self.setting("WEBHOOK_MAX_AGE_SECONDS"),
        }

    def is_invalid_recipient(self, response: requests.Response) -> bool:
        # Mailgun answers 400 {"message": "to parameter is not a valid address. please check documentation"}.
        if response.status_code != 400:
            return False
        try:
            message = str(response.json().get("message", ""))
        except (ValueError, AttributeError):
            message = response.text
        return "not a valid address" in message.lower() or "invalid address" in message.lower()

    @classmethod
    def event_id(cls, event: AnymailTrackingEvent) -> str:
        # anymail's event_id is the webhook signature's token, which is new with every delivery
        # of the webhook; Mailgun's own event id is the same in every retry and in the Events API,
        # so a receipt is stored once however it reaches us.
        esp_event = event.esp_event if isinstance(event.esp_event, dict) else {}
        event_id = esp_event.get("event-data", {}).get("id") or event.event_id or ""
        if not isinstance(event_id, str):
            raise ValueError(f"Mailgun event id is {type(event_id).__name__}, not text")
        return event_id

    @classmethod
    def stored_payload(cls, esp_event: Any) -> dict[str, Any]:
        # The signature, the token (and with them the timestamp they sign) would let whoever
        # reads a receipt replay it within the replay window: never kept, never shown.
        return {key: value for key, value in _plain(esp_event).items() if key not in SIGNATURE_FIELDS}

    # --- look-ups (Events API) ----------------------------------------------------------------
    def fetch_status(self, provider_message_id: str) -> StatusResult:
        """The most telling of the message's events; "unknown" (no state) when Mailgun shows none yet."""
        # Newest first from just past "now" back to Mailgun's retention limit.
        newest = datetime.now(UTC) + self.CLOCK_SLACK
        params = {"message-id": provider_message_id.strip("<>"), "begin": _epoch(newest), "ascending": "no"}
        best: tuple[tuple[int, float], AnymailTrackingEvent] | None = None
        for item in self._events(params):
            # anymail's own normalisation, so polling and webhooks speak the same vocabulary.
            event = self.webhook.esp_to_anymail_event({"event-data": item})
            state = self.status_map.get(event.event_type)
            rank = (self.PROGRESS.get(state, 0), float(item.get("timestamp", 0)))
            if best is None or rank > best[0]:
                best = (rank, event)
        if best is None:
            return StatusResult(provider_message_id, EventType.UNKNOWN, None)
        event = best[1]
        return StatusResult(provider_message_id, event.event_type, self.status_map.get(event.event_type))

    def find_send(self, request: SendRequest) -> list[SendResult]:
        """Mailgun has no idempotency key: search `accepted` events for our token.

        Filters: event=accepted and recipient narrow it server-side (documented filters); the
        user-variables filter narrows it further where Mailgun applies it, but it is not in the
        current API reference, so the token is checked again on every item.
        """
        now = datetime.now(UTC)
        params: dict[str, Any] = {
            "event": "accepted",
            "recipient": request.to,
            "user-variables": json.dumps({TOKEN_VAR: request.token}),
        }
        if request.attempted_since is not None:
            # A closed range, oldest first, so that paging ends instead of waiting for new events.
            params.update(begin=_epoch(request.attempted_since - self.CLOCK_SLACK), end=_epoch(now + self.CLOCK_SLACK))
        else:
            params.update(begin=_epoch(now + self.CLOCK_SLACK), ascending="no")  # back to retention
        found: dict[str, SendResult] = {}
        for item in self._events(params):
            if (item.get("user-variables") or {}).get(TOKEN_VAR) != request.token:
                continue
            message_id = item.get("message", {}).get("headers", {}).get("message-id")
            if message_id:
                provider_message_id = f"<{message_id.strip('<>')}>"  # as the send API answers it
                found.setdefault(provider_message_id, SendResult(provider_message_id, EventType.QUEUED))
        return list(found.values())

    def _events(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every item of an Events API query, following `paging.next` until an empty page."""
        items: list[dict[str, Any]] = []
        url, query = self.events_url, {**params, "limit": 300}
        for _ in range(self.MAX_EVENT_PAGES):
            try:
                response = self.session.get(url, params=query, timeout=self.config["TIMEOUT_SECONDS"])
            except requests.RequestException as exc:
                raise classify_transport(exc) from exc
            if response.status_code != 200:
                raise self.classify_answer(response, f"Mailgun Events API {response.status_code}: {response.text}")
            try:
                page = response.json()
                batch, url = page["items"], page["paging"]["next"]
            except (ValueError, KeyError, TypeError) as exc:
                raise AmbiguousProviderError(f"unreadable Events API page: {exc!r}", error_type=ErrorType.UNKNOWN)
            if not batch:
                return items
            items.extend(batch)
            query = None  # the next-page URL carries the query
        raise AmbiguousProviderError(
            f"more than {self.MAX_EVENT_PAGES} pages of Mailgun events; narrow the look-up",
            error_type=ErrorType.UNKNOWN,
        )


def _epoch(moment: datetime) -> str:
    return f"{moment.timestamp():.6f}"


def _plain(esp_event: Any) -> dict[str, Any]:
    """The raw event as JSON-storable data (legacy form posts arrive as a QueryDict)."""
    if isinstance(esp_event, dict):
        return esp_event
    if hasattr(esp_event, "lists"):
        return {key: values[0] if len(values) == 1 else values for key, values in esp_event.lists()}
    return {"raw": str(esp_event)}
