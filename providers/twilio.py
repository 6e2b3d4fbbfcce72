"""Twilio (SMS and WhatsApp) through the official SDK; base URL pointed at the sandbox by default."""

from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import aiohttp
import yarl
from django.http import HttpRequest
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.base.version import Version
from twilio.http.http_client import TwilioHttpClient
from twilio.http.response import Response as TwilioResponse
from twilio.request_validator import RequestValidator
from twilio.rest import Client
from twilio.twiml.messaging_response import MessagingResponse

from providers.base import REQUIRED, Provider
from providers.classify import classify_status
from providers.conf import providers_setting, receipt_base_urls, receipts_base_url
from providers.http import AbortingHTTPAdapter, aborting_socket
from providers.types import (
    AmbiguousProviderError,
    ErrorType,
    InboundMessage,
    ProviderError,
    ReceiptEvent,
    ReportedState,
    SendRequest,
    SendResult,
    StatusResult,
    WebhookSignatureError,
)

TWILIO_API_ORIGIN = "https://api.twilio.com"
# prepare()'s optional form fields -> the SDK's messages.create keywords (transmit() passes those given).
SDK_OPTIONAL_FIELDS = {
    "Body": "body",
    "ContentSid": "content_sid",
    "ContentVariables": "content_variables",
    "ValidityPeriod": "validity_period",
}


class _RoutedHttpClient(TwilioHttpClient):
    """The SDK's own HTTP client (pooled session), sent to a configurable origin.

    Also remembers the last response's headers per thread: the SDK's exception drops them,
    and a 429's Retry-After must be honoured.
    """

    def __init__(self, origin: str, timeout: float, pool_size: int):
        super().__init__(pool_connections=True, timeout=timeout)
        # As many keep-alive connections as sends a worker makes at once (the bulk path's
        # threads): a smaller pool discards and reopens a connection for every send beyond it.
        for prefix in ("http://", "https://"):
            self.session.mount(prefix, AbortingHTTPAdapter(pool_connections=1, pool_maxsize=pool_size))
        self.origin = origin.rstrip("/")
        # requests reads the environment (proxies, no_proxy, CA bundle) on every request: about a
        # third of a send's CPU (bench/README.md, profiles). Every request goes to one origin, so
        # read it once, as requests would, and keep it on the session.
        environment = self.session.merge_environment_settings(self.origin, {}, None, None, None)
        self.session.proxies.update(environment["proxies"])
        self.session.verify = environment["verify"]
        self.session.trust_env = False
        self.last_headers = threading.local()

    def request(self, method: str, url: str, *args: Any, **kwargs: Any):  # type: ignore[override]
        if url.startswith(TWILIO_API_ORIGIN) and self.origin != TWILIO_API_ORIGIN:
            url = self.origin + url[len(TWILIO_API_ORIGIN) :]
        self.last_headers.value = {}
        response = super().request(method, url, *args, **kwargs)
        self.last_headers.value = response.headers or {}  # requests' case-insensitive dict
        return response


class _AsyncSession:
    """One aiohttp session per event loop for the sends the bulk path makes many at once.

    Made on first use, on the loop that uses it; timeouts mean what they mean for requests (to
    connect, and between bytes of the answer), so the ambiguity rules hold.
    """

    def __init__(self, timeout: float, pool_size: int):
        self.timeout = timeout
        self.pool_size = pool_size
        self.session: aiohttp.ClientSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self.session is None or self.session.closed or self.loop is not loop:
            self.loop = loop
            self.session = aiohttp.ClientSession(
                # A send given up on can no longer reach Twilio later (providers.http).
                connector=aiohttp.TCPConnector(limit=self.pool_size, socket_factory=aborting_socket),
                cookie_jar=aiohttp.DummyCookieJar(),  # an API with basic auth: no cookies to keep or send
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout),
            )
        return self.session

    def close_soon(self) -> None:
        """Close the session on the loop it belongs to (callable from any thread)."""
        if self.session is not None and not self.session.closed and self.loop and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.session.close(), self.loop)


class TwilioProvider(Provider):
    name = "twilio"
    channels = frozenset({"sms", "whatsapp"})
    # Twilio's MessageStatus values (the Message resource's status enum).
    status_map = {
        "queued": ReportedState.DISPATCHED,
        "accepted": ReportedState.DISPATCHED,
        "scheduled": ReportedState.DISPATCHED,
        "sending": ReportedState.DISPATCHED,
        "sent": ReportedState.DISPATCHED,
        "delivered": ReportedState.DELIVERED,
        "partially_delivered": ReportedState.DELIVERED,
        "read": ReportedState.READ,
        "undelivered": ReportedState.UNDELIVERED,
        "failed": ReportedState.FAILED,
        "canceled": None,
        "receiving": None,
        "received": None,
    }
    # A `failed` status with one of these error codes is the message taken and not delivered in
    # time, our `undelivered` rather than a refusal: 30036 Validity Period Expired (it waited in
    # Twilio's queue past the ValidityPeriod we gave, docs/deadlines.md).
    undelivered_error_codes = frozenset({"30036"})
    # Twilio error codes (https://www.twilio.com/docs/api/errors): the recipient itself cannot
    # receive (the messaging layer suppresses the address for every category), or has
    # unsubscribed from our sender (21610 "Attempt to send to unsubscribed recipient": suppressed
    # like a STOP). 21408 (the account may not send to the number's region) is our account's
    # setting, not the number's: a plain refusal, replayable once the permission is granted.
    # A status callback's ErrorCode -> ErrorType of the failure it reports (any other: REJECTED):
    # WhatsApp's 63016, a free-form message outside the customer-service window, which Twilio
    # accepts and then fails.
    receipt_error_types = {"63016": ErrorType.OUTSIDE_SESSION_WINDOW}
    error_code_types = {
        **dict.fromkeys((21211, 21214, 21217, 21407, 21612, 21614, 63003), ErrorType.INVALID_RECIPIENT),
        21610: ErrorType.OPTED_OUT,
    }
    # ValidityPeriod: whole seconds in Twilio's queue, 1 to 36,000 (also its default without the
    # field; the Messages API's create parameters). docs/deadlines.md.
    validity_seconds = (1, 36_000)
    # An inbound message's reply is TwiML in the webhook's answer.
    replies_in_answer = True
    # TwilioException other than a REST error, or a ValueError: e.g. a 2xx the SDK could not parse.
    unreadable_errors = (TwilioException, ValueError)
    own_settings = {
        "ACCOUNT_SID": REQUIRED,
        "AUTH_TOKEN": REQUIRED,
        "FROM_NUMBER": REQUIRED,
        "WHATSAPP_FROM": REQUIRED,
        "BASE_URL": "",  # empty: Twilio itself
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        self.http_client = _RoutedHttpClient(
            self.setting("BASE_URL") or TWILIO_API_ORIGIN,
            config["TIMEOUT_SECONDS"],
            pool_size=providers_setting("BULK_SEND_CONCURRENCY"),
        )
        self.client = Client(config["ACCOUNT_SID"], config["AUTH_TOKEN"], http_client=self.http_client)
        self.async_session = _AsyncSession(
            config["TIMEOUT_SECONDS"], pool_size=providers_setting("BULK_SEND_CONCURRENCY")
        )
        # The request the SDK's messages.create makes, built once (see send_async).
        self.create_path = f"/2010-04-01/Accounts/{config['ACCOUNT_SID']}/Messages.json"
        self.create_url = yarl.URL((self.setting("BASE_URL") or TWILIO_API_ORIGIN).rstrip("/") + self.create_path)
        self.create_headers = {
            **self.client.get_headers(
                "POST", {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
            ),
            "Authorization": aiohttp.encode_basic_auth(config["ACCOUNT_SID"], config["AUTH_TOKEN"]),
        }
        self.validator = RequestValidator(config["AUTH_TOKEN"])

    def close(self) -> None:
        self.http_client.session.close()
        self.async_session.close_soon()

    # --- sending ------------------------------------------------------------------------------
    def _addresses(self, request: SendRequest) -> tuple[str, str]:
        if request.channel == "whatsapp":
            return f"whatsapp:{request.to}", self.config["WHATSAPP_FROM"]
        return request.to, self.config["FROM_NUMBER"]

    def prepare(self, request: SendRequest, now: datetime | None = None) -> dict[str, str]:
        """The Messages API's form fields (what the SDK's messages.create posts): ValidityPeriod is
        the time left before the deadline at this moment, in whole seconds rounded down (at most
        36,000, Twilio's own default: a longer deadline gets that)."""
        to, from_ = self._addresses(request)
        prepared = {"To": to, "From": from_, "StatusCallback": self.status_callback_url(request)}
        if request.template:
            # A WhatsApp template (Content API): its SID and variables, no Body (Twilio renders it).
            prepared["ContentSid"] = request.template
            if request.template_variables:
                prepared["ContentVariables"] = json.dumps(request.template_variables, separators=(",", ":"))
        else:
            prepared["Body"] = request.body
        left = self.validity_left(request, now=now)
        if left is not None:
            prepared["ValidityPeriod"] = str(left // timedelta(seconds=1))
        return prepared

    def status_callback_url(self, request: SendRequest) -> str:
        # Our id and token travel in the callback URL: Twilio's only client-reference field.
        query = urlencode({"message_id": request.message_id, "token": request.token})
        return f"{receipts_base_url()}/webhooks/twilio/?{query}"

    def transmit(self, prepared: dict[str, str]) -> SendResult:
        optional = {keyword: prepared[name] for name, keyword in SDK_OPTIONAL_FIELDS.items() if name in prepared}
        message = self.client.messages.create(
            to=prepared["To"], from_=prepared["From"], status_callback=prepared["StatusCallback"], **optional
        )
        return SendResult(provider_message_id=message.sid, provider_status=message.status)

    async def transmit_async(self, prepared: dict[str, str]) -> SendResult:
        """The request the SDK's messages.create makes (same form fields, headers and URL), posted
        straight through aiohttp.

        The SDK's own async client (its request pipeline and the Message resource it parses,
        some forty fields with their dates) cost 0.10 ms of a send's 0.35 ms of CPU, at a
        campaign's thousand sends a second (bench/README.md, profiles). Errors are the SDK's
        (Version.exception) and sorted by the same rules as transmit()'s.
        """
        async with self.async_session.get().post(
            self.create_url, data=urlencode(prepared).encode(), headers=self.create_headers, allow_redirects=False
        ) as response:
            status, text, headers = response.status, await response.text(encoding="utf-8"), response.headers
        if not 200 <= status < 300:
            error = Version.exception(
                "POST", self.create_path, TwilioResponse(status, text, headers), "Unable to create record"
            )
            if isinstance(error, TwilioRestException):
                raise self._answer_error(error, headers.get("Retry-After")) from error
            raise AmbiguousProviderError(str(error), error_type=ErrorType.UNKNOWN) from error
        try:
            payload = json.loads(text)
            return SendResult(provider_message_id=payload["sid"], provider_status=payload["status"])
        except (ValueError, KeyError, TypeError) as exc:
            # A 2xx we could not read: it may have been accepted.
            raise AmbiguousProviderError(f"Twilio {status}: unreadable answer", error_type=ErrorType.UNKNOWN) from exc

    def classify_error(self, exc: Exception) -> ProviderError | None:
        if isinstance(exc, TwilioRestException):
            # The SDK's exception drops the answer's headers; the client kept them (Retry-After).
            headers = getattr(self.http_client.last_headers, "value", None) or {}
            return self._answer_error(exc, headers.get("Retry-After"))
        return None

    def _answer_error(self, exc: TwilioRestException, retry_after: str | None) -> ProviderError:
        return classify_status(
            exc.status,
            f"Twilio {exc.status} {exc.code}: {exc.msg}",
            code=str(exc.code or ""),
            retry_after=retry_after,
            refusal_type=self.error_code_types.get(exc.code, ErrorType.REJECTED),
        )

    # --- look-ups -----------------------------------------------------------------------------
    def fetch_status(self, provider_message_id: str) -> StatusResult:
        try:
            message = self.client.messages(provider_message_id).fetch()
        except Exception as exc:
            self.raise_classified(exc)
        state = self.map_receipt_status(message.status, str(message.error_code or ""))
        return StatusResult(provider_message_id, message.status, state)

    def map_receipt_status(self, status: str, error_code: str) -> str | None:
        """map_status, refined by the error code: a validity that ran out is `undelivered`."""
        if status == "failed" and error_code in self.undelivered_error_codes:
            return ReportedState.UNDELIVERED
        return self.map_status(status)

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
            self.raise_classified(exc)
        found = []
        for message in candidates:
            created = message.date_created
            # A template's body is the text Twilio rendered, not ours: its time and recipient only.
            if not request.template and message.body != request.body:
                continue
            if since is not None and created is not None and created < since - timedelta(minutes=5):
                continue
            found.append(SendResult(message.sid, message.status))
        return found

    # --- receipts -----------------------------------------------------------------------------
    def verify(self, request: HttpRequest) -> None:
        # The SDK's validator compares in constant time.
        signature = request.headers.get("X-Twilio-Signature", "")
        path = request.get_full_path()
        # Signed over the URL Twilio posted to: the receipt intake's, or the web's (a callback URL
        # given before the intake had a base URL of its own, or a deployment that serves both at one).
        if not signature or not any(
            self.validator.validate(base + path, request.POST, signature) for base in receipt_base_urls()
        ):
            raise WebhookSignatureError("X-Twilio-Signature missing or not valid for this URL and body")

    def parse(self, request: HttpRequest) -> list[ReceiptEvent]:
        payload = {key: request.POST.get(key) for key in request.POST}
        sid = payload.get("MessageSid") or payload.get("SmsSid") or ""
        status = payload.get("MessageStatus") or payload.get("SmsStatus") or ""
        if not sid or not status:
            raise ValueError("Twilio status callback without MessageSid or MessageStatus")
        error_code = payload.get("ErrorCode") or ""
        return [
            ReceiptEvent(
                provider=self.name,
                # Twilio sends no event id; one status per message is one event.
                event_id=f"{sid}:{status}",
                provider_message_id=sid,
                provider_status=status,
                state=self.map_receipt_status(status, error_code),
                message_id=request.GET.get("message_id") or None,
                error_code=error_code,
                payload=payload,
            )
        ]

    # --- inbound messages (the number's "A message comes in" webhook) ---------------------------
    def parse_inbound(self, request: HttpRequest) -> InboundMessage:
        """Twilio's incoming message request: From, To, Body, MessageSid (form fields, or the query
        of a GET). A WhatsApp message's From and To carry a `whatsapp:` prefix."""
        form = request.POST if request.method == "POST" else request.GET  # the number may be set to GET
        for name in ("MessageSid", "From", "To"):
            if not form.get(name):
                raise ValueError(f"Twilio inbound message without {name}")
        sender, recipient = form["From"].strip(), form["To"].strip()
        channel = "whatsapp" if sender.lower().startswith("whatsapp:") else "sms"
        return InboundMessage(
            provider=self.name,
            channel=channel,
            from_=_without_channel_prefix(sender),
            to=_without_channel_prefix(recipient),
            body=form.get("Body") or "",  # a picture alone has none
            provider_message_id=form["MessageSid"],
        )

    def inbound_answer(self, reply: str) -> tuple[str, str]:
        """TwiML: a <Message> with the reply, or an empty <Response/> (nothing sent back)."""
        response = MessagingResponse()
        if reply:
            response.message(reply)
        return "text/xml", str(response)


def _without_channel_prefix(address: str) -> str:
    prefix, colon, rest = address.partition(":")
    return rest.strip() if colon and prefix.lower() == "whatsapp" else address
