"""Twilio (SMS and WhatsApp) through the official SDK; base URL pointed at the sandbox by default."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import requests
from django.http import HttpRequest
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from messaging.conf import conductor_setting
from messaging.models import ErrorType
from messaging.states import MessageState as S
from providers.base import (
    AmbiguousProviderError,
    PermanentProviderError,
    Provider,
    ReceiptEvent,
    SendRequest,
    SendResult,
    StatusResult,
    TransientProviderError,
    WebhookSignatureError,
)
from providers.http import never_connected, retry_after_seconds

TWILIO_API_ORIGIN = "https://api.twilio.com"
# Twilio error codes that mean the recipient itself is wrong (https://www.twilio.com/docs/api/errors).
INVALID_RECIPIENT_CODES = frozenset({21211, 21214, 21217, 21407, 21408, 21612, 21614, 63003})
UNSUBSCRIBED_CODES = frozenset({21610})


class _RoutedHttpClient(TwilioHttpClient):
    """The SDK's own HTTP client (pooled session), sent to a configurable origin.

    Also remembers the last response's headers per thread: the SDK's exception drops them,
    and a 429's Retry-After must be honoured.
    """

    def __init__(self, origin: str, timeout: float):
        super().__init__(pool_connections=True, timeout=timeout)
        self.origin = origin.rstrip("/")
        self.last_headers = threading.local()

    def request(self, method: str, url: str, *args: Any, **kwargs: Any):  # type: ignore[override]
        if url.startswith(TWILIO_API_ORIGIN) and self.origin != TWILIO_API_ORIGIN:
            url = self.origin + url[len(TWILIO_API_ORIGIN) :]
        self.last_headers.value = {}
        response = super().request(method, url, *args, **kwargs)
        self.last_headers.value = dict(response.headers or {})
        return response


class TwilioProvider(Provider):
    name = "twilio"
    channels = frozenset({"sms", "whatsapp"})
    # Twilio's MessageStatus values (the Message resource's status enum).
    status_map = {
        "queued": S.DISPATCHED,
        "accepted": S.DISPATCHED,
        "scheduled": S.DISPATCHED,
        "sending": S.DISPATCHED,
        "sent": S.DISPATCHED,
        "delivered": S.DELIVERED,
        "partially_delivered": S.DELIVERED,
        "read": S.READ,
        "undelivered": S.UNDELIVERED,
        "failed": S.FAILED,
        "canceled": None,
        "receiving": None,
        "received": None,
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.http_client = _RoutedHttpClient(config.get("BASE_URL") or TWILIO_API_ORIGIN, config["TIMEOUT_SECONDS"])
        self.client = Client(config["ACCOUNT_SID"], config["AUTH_TOKEN"], http_client=self.http_client)
        self.validator = RequestValidator(config["AUTH_TOKEN"])

    # --- sending ------------------------------------------------------------------------------
    def _addresses(self, request: SendRequest) -> tuple[str, str]:
        if request.channel == "whatsapp":
            return f"whatsapp:{request.to}", self.config["WHATSAPP_FROM"]
        return request.to, self.config["FROM_NUMBER"]

    def status_callback_url(self, request: SendRequest) -> str:
        # Our id and token travel in the callback URL: Twilio's only client-reference field.
        query = urlencode({"message_id": request.message_id, "token": request.token})
        return f"{conductor_setting('PUBLIC_URL').rstrip('/')}/webhooks/twilio/?{query}"

    def send(self, request: SendRequest) -> SendResult:
        to, from_ = self._addresses(request)
        try:
            message = self.client.messages.create(
                to=to, from_=from_, body=request.body, status_callback=self.status_callback_url(request)
            )
        except Exception as exc:  # sorted into the three kinds right below
            raise self._classify(exc) from exc
        return SendResult(provider_message_id=message.sid, provider_status=message.status)

    def _classify(self, exc: Exception) -> Exception:
        if isinstance(exc, TwilioRestException):
            return self._classify_rest_error(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return TransientProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
        if isinstance(exc, requests.exceptions.ReadTimeout):
            # The request left: Twilio may have accepted it.
            return AmbiguousProviderError("no response within the timeout", error_type=ErrorType.PROVIDER_TIMEOUT)
        if isinstance(exc, requests.exceptions.ConnectionError):
            if never_connected(exc):
                return TransientProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
            return AmbiguousProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
        if isinstance(exc, (TwilioException, requests.exceptions.RequestException, ValueError)):
            # e.g. a 2xx we could not parse: it may have been accepted.
            return AmbiguousProviderError(str(exc), error_type=ErrorType.UNKNOWN)
        return exc  # a bug, not a provider error: let it raise

    def _classify_rest_error(self, exc: TwilioRestException) -> Exception:
        status, code = exc.status, exc.code
        text = f"Twilio {status} {code}: {exc.msg}"
        if status == 429:
            return TransientProviderError(
                text, error_type=ErrorType.RATE_LIMITED, code=str(code or 429), retry_after=self._retry_after()
            )
        if status >= 500:
            return TransientProviderError(text, error_type=ErrorType.PROVIDER_5XX, code=str(code or status))
        if status in (401, 403):
            # Our credentials, not the message: retry (and dead-letter for replay once fixed).
            return TransientProviderError(text, error_type=ErrorType.PROVIDER_AUTH, code=str(code or status))
        if code in INVALID_RECIPIENT_CODES:
            return PermanentProviderError(text, error_type=ErrorType.INVALID_RECIPIENT, code=str(code))
        if code in UNSUBSCRIBED_CODES:
            return PermanentProviderError(text, error_type=ErrorType.REJECTED, code=str(code))
        return PermanentProviderError(text, error_type=ErrorType.REJECTED, code=str(code or status))

    def _retry_after(self) -> float | None:
        headers = getattr(self.http_client.last_headers, "value", {}) or {}
        return retry_after_seconds({k.lower(): v for k, v in headers.items()}.get("retry-after"))

    # --- look-ups -----------------------------------------------------------------------------
    def fetch_status(self, provider_message_id: str) -> StatusResult:
        try:
            message = self.client.messages(provider_message_id).fetch()
        except Exception as exc:
            raise self._classify(exc) from exc
        return StatusResult(provider_message_id, message.status, self.map_status(message.status))

    def find_send(self, request: SendRequest) -> list[SendResult]:
        """Twilio's Messages API has no idempotency key: list by recipient and day, match the body."""
        to, _ = self._addresses(request)
        since = request.attempted_since
        try:
            kwargs: dict[str, Any] = {"to": to, "limit": 200}
            if since is not None:
                kwargs["date_sent_after"] = since - timedelta(days=1)
            candidates = self.client.messages.list(**kwargs)
        except Exception as exc:
            raise self._classify(exc) from exc
        found = []
        for message in candidates:
            created = message.date_created
            if message.body != request.body:
                continue
            if since is not None and created is not None and created < since - timedelta(minutes=5):
                continue
            found.append(SendResult(message.sid, message.status))
        return found

    # --- receipts -----------------------------------------------------------------------------
    def parse_webhook(self, request: HttpRequest) -> list[ReceiptEvent]:
        signature = request.headers.get("X-Twilio-Signature", "")
        url = conductor_setting("PUBLIC_URL").rstrip("/") + request.get_full_path()
        if not signature or not self.validator.validate(url, request.POST, signature):
            raise WebhookSignatureError("X-Twilio-Signature missing or not valid for this URL and body")
        payload = {key: request.POST.get(key) for key in request.POST}
        sid = payload.get("MessageSid") or payload.get("SmsSid") or ""
        status = payload.get("MessageStatus") or payload.get("SmsStatus") or ""
        if not sid or not status:
            raise ValueError("Twilio status callback without MessageSid or MessageStatus")
        return [
            ReceiptEvent(
                provider=self.name,
                # Twilio sends no event id; one status per message is one event.
                event_id=f"{sid}:{status}",
                provider_message_id=sid,
                provider_status=status,
                state=self.map_status(status),
                message_id=request.GET.get("message_id") or None,
                error_code=payload.get("ErrorCode") or "",
                payload=payload,
            )
        ]
