"""Vonage SMS through the official modular SDK; look-ups through its Reports API; signed delivery receipts."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from vonage_http_client import Auth, HttpClient, HttpClientOptions, HttpRequestError
from vonage_sms import PartialFailureError, Sms, SmsError, SmsMessage

from providers.base import REQUIRED, Provider
from providers.classify import classify_status, classify_transport
from providers.conf import receipts_base_url
from providers.http import AbortingHTTPAdapter, never_connected
from providers.types import (
    AmbiguousProviderError,
    ErrorType,
    InboundMessage,
    PermanentProviderError,
    ProviderError,
    ReceiptEvent,
    ReportedState,
    SendRequest,
    SendResult,
    StatusResult,
    TransientProviderError,
    WebhookSignatureError,
)

RECORDS_PATH = "/v2/reports/records"
# Vonage refuses a longer per-message `callback`, and the SDK's SmsMessage validates the same limit.
CALLBACK_MAX_LENGTH = 100
# The synchronous Reports API takes a date window of at most one day.
RECORDS_MAX_WINDOW = timedelta(hours=24)
# Clock skew between us and Vonage when searching by the time we sent.
LOOKUP_SLACK = timedelta(minutes=5)
SIGNATURE_METHODS = frozenset({"md5hash", "md5", "sha1", "sha256", "sha512"})

# SMS API send statuses (https://developer.vonage.com/api-errors/sms), "0" being success.
TRANSIENT_STATUSES = {
    "1": ErrorType.RATE_LIMITED,  # Throttled: over the account's message rate
    "5": ErrorType.PROVIDER_5XX,  # Internal Error
    "10": ErrorType.RATE_LIMITED,  # Too Many Existing Binds: back off and retry
}
# Our account, not the message: retry (and dead-letter for replay once an operator fixes it).
# Invalid Credentials, Partner Account Barred, Partner Quota Violation, Invalid Signature,
# Signature And API Secret Disallowed.
ACCOUNT_STATUSES = frozenset({"4", "8", "9", "14", "32"})
# Invalid Message (unrecognised number prefix), Number De-activated; "3" (Invalid Parameters) only
# when its error-text is about the `to` address. "29" (Non-Whitelisted Destination) is a demo
# account's limit, not the number's: a plain refusal (REJECTED), nothing suppressed.
INVALID_RECIPIENT_STATUSES = frozenset({"6", "33"})
# Number Barred: "blacklisted and may not receive them", Vonage's block list, where a recipient's
# STOP puts the number; the SMS API's one synchronous opt-out answer (an opt-out Vonage learns by
# Opt-out Assist comes later, as a delivery receipt's err-code 9).
OPTED_OUT_STATUSES = frozenset({"7"})


class _Unanswered(requests.exceptions.RequestException):
    """The connection dropped after the request went out: Vonage may have accepted it.

    Deliberately not a requests ConnectionError: the SDK's HttpClient.make_request resends any
    ConnectionError mentioning RemoteDisconnected, which for POST /sms/json is a blind resend.
    """


class _Transport(AbortingHTTPAdapter):
    """The HTTP adapter mounted for the SDK's https:// URLs (one pooled session per adapter instance).

    The SDK always builds `https://{host}{path}`; this adapter sends them over plain http when
    BASE_URL is http (the sandbox has no TLS), applies our timeout (HttpClientOptions takes whole
    seconds only), does no retries of its own (Conductor's retry policy and circuit breaker decide),
    and remembers the last response per thread, because SmsError keeps only a formatted message.
    """

    def __init__(self, *, plain_http: bool, timeout: float, pool_maxsize: int):
        super().__init__(pool_connections=1, pool_maxsize=pool_maxsize, max_retries=0)
        self.plain_http = plain_http
        self.timeout = timeout
        self.last = threading.local()

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if self.plain_http and request.url and request.url.startswith("https://"):
            request.url = "http://" + request.url.removeprefix("https://")
        kwargs["timeout"] = self.timeout
        self.last.response = None
        try:
            response = super().send(request, *args, **kwargs)
        except requests.exceptions.ConnectionError as exc:
            if never_connected(exc):
                raise
            raise _Unanswered(str(exc)) from exc  # sorted by the ConnectionError it carries
        self.last.response = response
        return response

    def last_json(self) -> dict[str, Any]:
        response = getattr(self.last, "response", None)
        try:
            payload = response.json() if response is not None else {}
        except ValueError:
            return {}
        return payload if isinstance(payload, dict) else {}


class _HttpClient(HttpClient):
    """The SDK's HTTP client with our transport mounted in place of its own https:// adapter."""

    def __init__(self, auth: Auth, options: HttpClientOptions, transport: _Transport):
        super().__init__(auth, options, version("vonage"))
        self._session.mount("https://", transport)


class VonageProvider(Provider):
    name = "vonage"
    channels = frozenset({"sms"})
    # Delivery-receipt statuses (also the Reports API's SMS status filter values).
    status_map = {
        "accepted": ReportedState.DISPATCHED,
        "buffered": ReportedState.DISPATCHED,
        "delivered": ReportedState.DELIVERED,
        "expired": ReportedState.UNDELIVERED,
        "failed": ReportedState.UNDELIVERED,
        "deleted": ReportedState.UNDELIVERED,
        "rejected": ReportedState.FAILED,  # refused by Vonage or the carrier (e.g. an illegal number): permanent
        "unknown": None,
    }
    # ttl: milliseconds Vonage keeps trying to deliver, 20,000 to 604,800,000 (7 days; 72 h without
    # the field), as the SMS API documents and the SDK's SmsMessage checks. docs/deadlines.md.
    validity_seconds = (20, 604_800)
    # e.g. a 2xx we could not parse (pydantic's ValidationError is a ValueError): it may have been accepted.
    unreadable_errors = (KeyError, TypeError, ValueError)
    own_settings = {
        "API_KEY": REQUIRED,
        "API_SECRET": REQUIRED,
        "SIGNATURE_SECRET": REQUIRED,
        "SIGNATURE_METHOD": REQUIRED,
        "FROM": REQUIRED,
        "BASE_URL": "",  # empty: Vonage itself
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        method = config["SIGNATURE_METHOD"]
        if method not in SIGNATURE_METHODS:
            raise ImproperlyConfigured(f"VONAGE SIGNATURE_METHOD must be one of {', '.join(sorted(SIGNATURE_METHODS))}")
        self.callback_url = receipts_base_url() + "/webhooks/vonage/"
        if len(self.callback_url) > CALLBACK_MAX_LENGTH:
            raise ImproperlyConfigured(f"Vonage takes a callback URL of at most {CALLBACK_MAX_LENGTH} characters")
        # An empty BASE_URL means Vonage itself; otherwise both hosts (rest.nexmo.com for SMS,
        # api.nexmo.com for reports) are that one origin, as the sandbox serves both paths.
        base = urlsplit(self.setting("BASE_URL"))
        options = HttpClientOptions(**({"api_host": base.netloc, "rest_host": base.netloc} if base.netloc else {}))
        self.transport = _Transport(
            plain_http=base.scheme == "http", timeout=config["TIMEOUT_SECONDS"], pool_maxsize=options.pool_maxsize
        )
        self.http = _HttpClient(
            Auth(api_key=config["API_KEY"], api_secret=config["API_SECRET"]), options, self.transport
        )
        self.sms = Sms(self.http)
        # The SDK verifies HMAC signatures; it no longer implements Vonage's default "MD5 hash".
        self.signer = None
        if method != "md5hash":
            self.signer = Auth(
                api_key=config["API_KEY"], signature_secret=config["SIGNATURE_SECRET"], signature_method=method
            )

    # --- sending ------------------------------------------------------------------------------
    def prepare(self, request: SendRequest, now: datetime | None = None) -> SmsMessage:
        # ttl: the time left before the deadline at this moment, in milliseconds rounded down (at
        # most 7 days: a longer deadline gets that).
        left = self.validity_left(request, now=now)
        # client-ref carries the token "<message id>.<generation>": attribution in every receipt
        # and report, covered by the receipt's signature (a URL query would not be, and would not
        # fit in the 100-character callback).
        return SmsMessage(
            to=request.to.removeprefix("+"),  # Vonage wants E.164 digits without the plus
            from_=self.config["FROM"],
            text=request.body,
            client_ref=request.token,
            callback=self.callback_url,  # per message, so receipts reach this deployment whatever the dashboard says
            ttl=None if left is None else left // timedelta(milliseconds=1),
        )

    def transmit(self, prepared: SmsMessage) -> SendResult:
        response = self.sms.send(prepared)
        first = response.messages[0]  # a long text is several parts; receipts carry client-ref anyway
        return SendResult(provider_message_id=first.message_id or "", provider_status=first.status or "0")

    def classify_error(self, exc: Exception) -> ProviderError | None:
        if isinstance(exc, PartialFailureError):
            # Some parts were accepted: a resend would duplicate them, so reconcile instead.
            return AmbiguousProviderError("Vonage accepted only some parts", error_type=ErrorType.UNKNOWN)
        if isinstance(exc, SmsError):
            # A 200 answer whose message status is an error: SmsError keeps only a formatted text.
            messages = self.transport.last_json().get("messages") or [{}]
            first = messages[0] if isinstance(messages[0], dict) else {}
            return _classify_sms_status(str(first.get("status", "")), str(first.get("error-text", exc)))
        if isinstance(exc, HttpRequestError):
            response = exc.response
            return classify_status(
                response.status_code,
                f"Vonage HTTP {response.status_code}: {response.text[:200]}",
                retry_after=response.headers.get("Retry-After"),
            )
        if isinstance(exc, _Unanswered):
            return classify_transport(exc.__cause__ or exc)
        return None

    # --- look-ups (synchronous Reports API) -----------------------------------------------------
    def _records(self, **filters: str) -> list[dict[str, Any]]:
        """Every SMS (outbound) record matching `filters`, following TRUNCATED pages."""
        params = {"account_id": self.config["API_KEY"], "product": "SMS", "direction": "outbound", **filters}
        records: list[dict[str, Any]] = []
        while True:
            try:
                page = self.http.get(self.http.api_host, RECORDS_PATH, dict(params), auth_type="basic")
                records.extend(page["records"] or [])
                if page["request_status"] != "TRUNCATED":
                    return records
                # The next page is the same query plus the cursor and iv given in its link.
                query = parse_qs(urlsplit(page["_links"]["next"]["href"]).query)
                params.update(cursor=query["cursor"][0], iv=query["iv"][0])
            except Exception as exc:  # sorted like a send's errors; an unreadable page is ambiguous
                self.raise_classified(exc)

    def fetch_status(self, provider_message_id: str) -> StatusResult:
        found = [r for r in self._records(id=provider_message_id) if r.get("message_id") == provider_message_id]
        if not found:
            # Reports can lag behind the SMS API: not there yet is not "never sent".
            raise TransientProviderError(
                f"no Vonage record of {provider_message_id} yet", error_type=ErrorType.UNKNOWN, code="ids_not_found"
            )
        status = found[0].get("status") or "unknown"
        return StatusResult(provider_message_id, status, self.map_status(status))

    def find_send(self, request: SendRequest) -> list[SendResult]:
        """Records sent since the first attempt (a day back when unknown) whose client-ref is our token.

        The synchronous Reports API filters by date (at most a day per query) but not by
        client-ref, so the window is listed and matched here; the token is exact, no body match.
        """
        end = datetime.now(UTC) + timedelta(minutes=1)
        start = request.attempted_since - LOOKUP_SLACK if request.attempted_since else end - RECORDS_MAX_WINDOW
        found = []
        while start < end:
            stop = min(start + RECORDS_MAX_WINDOW, end)
            for record in self._records(date_start=_vonage_time(start), date_end=_vonage_time(stop)):
                if record.get("client_ref") == request.token and record.get("message_id"):
                    found.append(SendResult(record["message_id"], record.get("status") or "unknown"))
            start = stop
        return found

    # --- receipts -----------------------------------------------------------------------------
    def verify(self, request: HttpRequest) -> None:
        payload = _webhook_params(request)
        sig = payload.get("sig")
        # A sig that is not ASCII text is no signature of ours (and hmac.compare_digest raises on it).
        if not isinstance(sig, str) or not sig or not sig.isascii() or not self._signature_valid(payload):
            raise WebhookSignatureError("Vonage receipt without a valid sig for our signature secret")

    def parse(self, request: HttpRequest) -> list[ReceiptEvent]:
        payload = _webhook_params(request)
        message_id, status = payload.get("messageId"), payload.get("status")
        if not message_id or not status:
            raise ValueError("Vonage delivery receipt without messageId or status")
        if not isinstance(message_id, str) or not isinstance(status, str):
            raise ValueError("Vonage delivery receipt whose messageId or status is not text")
        client_ref = payload.get("client-ref") or ""
        if not isinstance(client_ref, str):
            raise ValueError("Vonage delivery receipt whose client-ref is not text")
        err_code = payload.get("err-code") or ""
        if not isinstance(err_code, (str, int)) or isinstance(err_code, bool):
            raise ValueError("Vonage delivery receipt whose err-code is not text")
        err_code = str(err_code)
        return [
            ReceiptEvent(
                provider=self.name,
                # DLRs have no event id; one status per message is one event, so a re-sent DLR is a duplicate.
                event_id=f"{message_id}:{status}",
                provider_message_id=message_id,
                provider_status=status,
                state=self.map_status(status),
                # client-ref is our send token "<message id>.<generation>" (the base checks the id).
                message_id=client_ref.rpartition(".")[0] or None,
                error_code="" if err_code == "0" else err_code,
                # The signature is not kept: whoever reads a receipt could post it again.
                payload={key: value for key, value in payload.items() if key != "sig"},
            )
        ]

    def _signature_valid(self, payload: dict[str, Any]) -> bool:
        # Both compare in constant time (the SDK's check_signature with hmac.compare_digest).
        if self.signer is not None:
            return self.signer.check_signature(dict(payload))  # it pops `sig`: give it a copy
        return hmac.compare_digest(str(payload["sig"]).lower(), _md5hash(payload, self.config["SIGNATURE_SECRET"]))

    # --- inbound messages (the account's or number's "Inbound SMS" webhook) -----------------------
    def parse_inbound(self, request: HttpRequest) -> InboundMessage:
        """Vonage's inbound SMS: msisdn (the sender), to (our virtual number), messageId, text;
        as a form, JSON or a GET query, signed like receipts. A binary message has no text, and
        each part of a concatenated one comes alone (its own messageId): neither is a keyword."""
        payload = _webhook_params(request)
        values: dict[str, str] = {}
        for name in ("msisdn", "to", "messageId", "text"):
            value = payload.get(name)
            if value is None or value == "":
                if name == "text":
                    value = ""
                else:
                    raise ValueError(f"Vonage inbound message without {name}")
            if not isinstance(value, str):
                raise ValueError(f"Vonage inbound message whose {name} is not text")
            values[name] = value
        return InboundMessage(
            provider=self.name,
            channel="sms",
            from_=_e164(values["msisdn"]),
            to=_e164(values["to"]),
            body=values["text"],
            provider_message_id=values["messageId"],
        )


def _e164(number: str) -> str:
    """Vonage's numbers are E.164 digits without the plus; anything else (a sender id) as it is."""
    number = number.strip()
    return f"+{number}" if number.isdigit() else number


def _classify_sms_status(status: str, text: str) -> ProviderError:
    """An SMS API message status (inside a 200 answer) as one of the three errors."""
    message = f"Vonage status {status}: {text}"
    if status in TRANSIENT_STATUSES:
        return TransientProviderError(message, error_type=TRANSIENT_STATUSES[status], code=status)
    if status in ACCOUNT_STATUSES:
        return TransientProviderError(message, error_type=ErrorType.PROVIDER_AUTH, code=status)
    if status in OPTED_OUT_STATUSES:
        return PermanentProviderError(message, error_type=ErrorType.OPTED_OUT, code=status)
    if status in INVALID_RECIPIENT_STATUSES or (status == "3" and "to address" in text.lower()):
        return PermanentProviderError(message, error_type=ErrorType.INVALID_RECIPIENT, code=status)
    return PermanentProviderError(message, error_type=ErrorType.REJECTED, code=status)


def _vonage_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _webhook_params(request: HttpRequest) -> dict[str, Any]:
    """A DLR's parameters: Vonage posts a form or JSON, or sends them as a GET query string.
    Read once per request (verify() and parse() both need them), kept on the request."""
    cached = getattr(request, "_vonage_params", None)
    if cached is None:
        cached = request._vonage_params = _read_webhook_params(request)
    return cached


def _read_webhook_params(request: HttpRequest) -> dict[str, Any]:
    if request.content_type == "application/json":
        try:
            payload = json.loads(request.body or b"{}")
        except ValueError as exc:
            raise ValueError(f"Vonage receipt body is not JSON: {exc}") from exc
        if not isinstance(payload, dict):
            raise ValueError("Vonage receipt body is not a JSON object")
        return payload
    params = request.POST if request.method == "POST" and request.POST else request.GET
    return {key: params.get(key) for key in params}


def _md5hash(payload: dict[str, Any], secret: str) -> str:
    """Vonage's default "MD5 hash" signature: MD5 of the sorted `&key=value` text followed by the secret."""
    text = "".join(
        f"&{key}={str(payload[key]).replace('&', '_').replace('=', '_')}" for key in sorted(payload) if key != "sig"
    )
    return hashlib.md5((text + secret).encode()).hexdigest()
