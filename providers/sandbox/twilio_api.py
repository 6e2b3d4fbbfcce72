"""Twilio's Messages API (2010-04-01) wire format: create, fetch, list, and signed status callbacks."""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from aiohttp import web
from twilio.request_validator import RequestValidator

from providers.sandbox.receipts import Encoded, form_body, schedule_status_callbacks
from providers.sandbox.retries import twilio_policy
from providers.sandbox.state import (
    CONFIG_KEY,
    FAULT_AUTH,
    FAULT_INVALID,
    FAULT_OPTED_OUT,
    FAULT_OUTAGE,
    FAULT_OUTSIDE_SESSION_WINDOW,
    FAULT_RATE_429,
    STATE_KEY,
    SandboxConfig,
    StoredMessage,
    utcnow,
)

PROVIDER = "twilio"
API_VERSION = "2010-04-01"
BASE = f"/{API_VERSION}/Accounts/{{account_sid}}"
E164 = re.compile(r"^\+\d{8,15}$")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Twilio's error codes for the receipt statuses that are not successes.
RECEIPT_ERRORS = {
    "undelivered": (30003, "Unreachable destination handset"),
    "failed": (30008, "Unknown error"),
}
# WhatsApp's refusal of a free-form message outside the customer-service window: Twilio accepts
# the request, then the status callback reports `failed` with this code.
OUTSIDE_WINDOW_ERROR = (
    63016,
    "Failed to send freeform message because you are outside the allowed window. Please use a Template.",
)
CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
# A message whose ValidityPeriod ran out in the queue: `failed` with this error
# (https://www.twilio.com/docs/api/errors/30036), at the moment the validity ended.
VALIDITY_EXPIRED = (30036, "Validity Period Expired")
# ValidityPeriod's range (the Messages API's create parameters); outside it Twilio answers 21624.
VALIDITY_RANGE = (1, 36_000)
# Statuses that carry the carrier's delivery receipt time (RawDlrDoneDate, SMS only):
# https://www.twilio.com/en-us/changelog/addition-of-rawdlrdonedate-to-delivered-and-undelivered-status-webhooks
DLR_STATUSES = frozenset({"delivered", "undelivered"})
# Callbacks that still come for a dropped message or a lost receipt: a carrier had it.
INTERMEDIATE_STATUSES = frozenset({"sent"})
# Refusals the fault settings inject: (HTTP status, Twilio code, message).
REFUSALS = {
    FAULT_OUTAGE: (503, 20503, "Service Unavailable"),
    FAULT_RATE_429: (429, 20429, "Too Many Requests"),
    "error": (500, 20500, "Internal Server Error"),
}


def twilio_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    payload = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return web.json_response(payload, status=status, headers=headers)


def rfc2822(moment: datetime | None) -> str | None:
    # Twilio answers in RFC 2822 at whole seconds, e.g. "Thu, 24 Aug 2023 05:01:45 +0000".
    return _rfc2822_at(moment.replace(microsecond=0)) if moment else None


@functools.lru_cache(maxsize=256)
def _rfc2822_at(second: datetime) -> str:
    # Three dates per answer, mostly the same second: formatting them was a tenth of the
    # sandbox's CPU at a campaign's rate, on the machine it shares with the workers it serves.
    return format_datetime(second)


def _authorized(request: web.Request) -> bool:
    # Decoded by hand: aiohttp 3.14 deprecates BasicAuth.
    config = request.app[CONFIG_KEY]
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    try:
        login, _, password = base64.b64decode(encoded, validate=True).decode("latin-1").partition(":")
    except ValueError:  # binascii.Error is a ValueError
        return False
    return (
        scheme.lower() == "basic"
        and request.match_info["account_sid"] == config.twilio_account_sid
        and hmac.compare_digest(login.encode(), config.twilio_account_sid.encode())
        and hmac.compare_digest(password.encode(), config.twilio_auth_token.encode())
    )


def _guard(request: web.Request) -> web.Response | None:
    """Outage and credentials, the only checks that fetch and list share with create."""
    if request.app[STATE_KEY].faults[PROVIDER].outage:
        return twilio_error(*REFUSALS[FAULT_OUTAGE])
    if not _authorized(request):
        return twilio_error(401, 20003, "Authenticate")
    return None


def _attribution(callback_url: str | None) -> tuple[str | None, str | None]:
    # Our adapter carries its message id and send token in the StatusCallback query string.
    if not callback_url:
        return None, None
    query = parse_qs(urlsplit(callback_url).query)
    return query.get("message_id", [None])[0], query.get("token", [None])[0]


def _invalid(form: Any) -> tuple[int, str] | None:
    to = form.get("To")
    if not to:
        return 21604, "A 'To' phone number is required."
    if not E164.match(to.removeprefix("whatsapp:")):
        return 21211, f"The 'To' number {to} is not a valid phone number."
    if not form.get("From") and not form.get("MessagingServiceSid"):
        return 21603, "A 'From' phone number is required."
    if form.get("ContentVariables") and not form.get("ContentSid"):
        return 21654, "A ContentSid must be specified if ContentVariables are provided."
    if form.get("ContentSid"):
        if not CONTENT_SID.match(form["ContentSid"]):
            return 21655, "The ContentSid is Invalid."
        if form.get("ContentVariables") and not _content_variables(form["ContentVariables"]):
            return 21656, "The ContentVariables Parameter is invalid."
        return None
    if not form.get("Body") and not form.get("MediaUrl"):
        return 21602, "Message body is required."
    if form.get("ValidityPeriod") is not None and _validity_period(form) is None:
        return 21624, "Invalid validity period value"
    return None


def _content_variables(text: str) -> dict[str, str] | None:
    """ContentVariables as Twilio takes it: a JSON object of placeholders to non-empty text."""
    try:
        variables = json.loads(text)
    except ValueError:
        return None
    if not isinstance(variables, dict) or not all(isinstance(v, str) and v for v in variables.values()):
        return None
    return variables


def _content(form: Any) -> dict[str, Any] | None:
    """What the request log keeps of a template message: its ContentSid and ContentVariables (parsed)."""
    if not form.get("ContentSid"):
        return None
    variables = form.get("ContentVariables")
    return {"content_sid": form["ContentSid"], "content_variables": _content_variables(variables) if variables else {}}


def _validity_period(form: Any) -> int | None:
    """The request's ValidityPeriod in seconds, None when absent or not a whole number in range."""
    try:
        value = int(form.get("ValidityPeriod") or "")
    except ValueError:
        return None
    return value if VALIDITY_RANGE[0] <= value <= VALIDITY_RANGE[1] else None


def _receipt_error(message: StoredMessage, status: str) -> tuple[int, str] | tuple[None, None]:
    """The ErrorCode and message a status carries: the message's own (an expired validity, a
    free-form WhatsApp message outside the window), else the status's usual one."""
    if status == message.final_status and "receipt_error" in message.extra:
        return message.extra["receipt_error"]
    return RECEIPT_ERRORS.get(status, (None, None))


def resource(message: StoredMessage, account_sid: str, *, status: str | None = None) -> dict[str, Any]:
    """The Message resource JSON; `status` overrides the stored one (create answers `queued`)."""
    now = utcnow()
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{message.provider_message_id}"
    current = message.status_at(now)
    error_code, error_message = _receipt_error(message, current)
    return {
        "account_sid": account_sid,
        "api_version": API_VERSION,
        "body": message.body,
        "date_created": rfc2822(message.created_at),
        "date_sent": rfc2822(message.created_at),
        "date_updated": rfc2822(message.updated_at(now)),
        "direction": "outbound-api",
        "error_code": error_code,
        "error_message": error_message,
        "from": message.from_,
        "messaging_service_sid": message.extra.get("messaging_service_sid"),
        "num_media": "0",
        "num_segments": "1",
        "price": None,
        "price_unit": "USD",
        "sid": message.provider_message_id,
        "status": status or current,
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": message.to,
        "uri": f"{uri}.json",
    }


class _Params(dict[str, str]):
    """Form parameters with the `getall` the SDK's validator looks for first: given a plain dict it
    raises and catches two exceptions per parameter, which more than doubles the signing time."""

    def getall(self, name: str) -> list[str]:
        return [self[name]]


class StatusCallbacks:
    """Twilio's status callback wire format, signed as Twilio signs it (one validator per account)."""

    def __init__(self, config: SandboxConfig) -> None:
        self.account_sid = config.twilio_account_sid
        self.validator = RequestValidator(config.twilio_auth_token)

    def encode(self, message: StoredMessage, status: str) -> Encoded:
        # The connection overrides in the fragment are Twilio's, never sent: sign what is posted.
        url = (message.callback_url or "").partition("#")[0]
        params = _Params(
            MessageSid=message.provider_message_id,
            SmsSid=message.provider_message_id,
            SmsStatus=status,
            MessageStatus=status,
            AccountSid=self.account_sid,
            From=message.from_,
            To=message.to,
            ApiVersion=API_VERSION,
        )
        error_code, _ = _receipt_error(message, status)
        if error_code is not None:
            params["ErrorCode"] = str(error_code)
        if status in DLR_STATUSES and message.channel == "sms" and message.final_at is not None:
            params["RawDlrDoneDate"] = message.final_at.strftime("%y%m%d%H%M")
        headers = {
            "X-Twilio-Signature": self.validator.compute_signature(url, params),
            "Content-Type": "application/x-www-form-urlencoded",
            # The same for every attempt of one callback, so a receiver can drop a retry it already has.
            "I-Twilio-Idempotency-Token": f"{message.provider_message_id}-{status}",
        }
        return form_body(params), headers


def callback_statuses(final_status: str, channel: str) -> list[str]:
    """The status callbacks Twilio posts for a message that ends in `final_status`, in order:
    none for the initial `queued`; `sent` once a carrier has it (not for a message that could not
    be sent at all); WhatsApp's `delivered` before `read`."""
    if final_status == "failed":
        return ["failed"]
    if final_status == "read" and channel == "whatsapp":
        return ["sent", "delivered", "read"]
    return ["sent", final_status]


async def create_message(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    form = await request.post()
    account_sid = request.match_info["account_sid"]
    to, body, callback_url = form.get("To"), form.get("Body"), form.get("StatusCallback")
    message_id, token = _attribution(callback_url)
    channel = "whatsapp" if (to or "").startswith("whatsapp:") else "sms"

    attribution = {
        "provider": PROVIDER,
        "channel": channel,
        "message_id": message_id,
        "token": token,
        "to": to,
        "body": body,
        # What the request asked of the validity, as sent (None: Twilio's default, 36,000 s), and
        # a template message's ContentSid and ContentVariables (parsed).
        "fields": {"validity_period": form.get("ValidityPeriod"), **(_content(form) or {})},
    }

    async def refuse(response: web.Response, fault: str, delay_s: float) -> web.Response:
        return await state.refuse(response, fault=fault, delay_s=delay_s, **attribution)

    refusal = _guard(request)
    if refusal is not None:
        fault = FAULT_OUTAGE if refusal.status == 503 else FAULT_AUTH
        return await refuse(refusal, fault, state.latency_s(PROVIDER))
    invalid = _invalid(form)
    if invalid is not None:
        return await refuse(twilio_error(400, *invalid), FAULT_INVALID, state.latency_s(PROVIDER))
    if channel == "sms" and state.is_opted_out(PROVIDER, to):
        # What Twilio answers once the recipient texted STOP to the sender (error 21610).
        unsubscribed = twilio_error(400, 21610, "Attempt to send to unsubscribed recipient")
        return await refuse(unsubscribed, FAULT_OPTED_OUT, state.latency_s(PROVIDER))

    # Free-form WhatsApp to a number that has not written within the window: accepted, then failed.
    outside_window = (
        channel == "whatsapp"
        and not form.get("ContentSid")
        and not state.whatsapp_window_open(PROVIDER, (to or "").removeprefix("whatsapp:"))
    )
    outcome = state.draw_send_outcome(PROVIDER, to)
    if outcome.refusal:
        headers = {"Retry-After": "1"} if outcome.refusal == FAULT_RATE_429 else None
        response = twilio_error(*REFUSALS[outcome.refusal], headers=headers)
        return await refuse(response, outcome.refusal, outcome.response_delay_s)

    # Accepted: stored, logged and its receipt queued before the (possibly held) answer, because
    # a client that times out has still caused a send; that is the ambiguous case to reconcile.
    message = state.store_message(
        provider=PROVIDER,
        provider_message_id=f"SM{uuid.uuid4().hex}",
        channel=channel,
        to=to,
        from_=form.get("From") or "",
        body=body or "",
        message_id=message_id,
        token=token,
        callback_url=callback_url or None,
        outcome=outcome,
        extra={"messaging_service_sid": form.get("MessagingServiceSid")},
    )
    if outside_window and message.final_status is not None:
        message.final_status = "failed"
        message.extra["receipt_error"] = OUTSIDE_WINDOW_ERROR
    state.record_request(
        **attribution,
        accepted=True,
        status_code=201,
        provider_message_id=message.provider_message_id,
        fault=FAULT_OUTSIDE_SESSION_WINDOW if outside_window else outcome.fault,
    )
    if state.faults[PROVIDER].callback_mode == "realistic" and channel == "sms" and message.final_status == "read":
        message.final_status = "delivered"  # read receipts are WhatsApp's; an SMS ends delivered
    # Still queued when its validity ends: Twilio does not send it, and fails it with 30036.
    state.expire_after(message, _validity_period(form), status="failed", receipt_error=VALIDITY_EXPIRED)
    if message.callback_url:
        schedule_status_callbacks(
            request.app,
            provider=PROVIDER,
            message=message,
            delivery=outcome.delivery,
            url=message.callback_url.partition("#")[0],
            statuses=callback_statuses(message.final_status or "delivered", message.channel),
            final_only_status=message.final_status,
            intermediate=INTERMEDIATE_STATUSES,
            policy=twilio_policy(urlsplit(message.callback_url).fragment),
        )
    payload = resource(message, account_sid, status="queued")
    await asyncio.sleep(outcome.response_delay_s)
    return web.json_response(payload, status=201)


async def fetch_message(request: web.Request) -> web.Response:
    refusal = _guard(request)
    if refusal is not None:
        return refusal
    account_sid, sid = request.match_info["account_sid"], request.match_info["sid"]
    state = request.app[STATE_KEY]
    await asyncio.sleep(state.latency_s(PROVIDER))  # a status look-up takes as long as a send
    message = state.messages.get(sid)
    if message is None or message.provider != PROVIDER:
        return twilio_error(404, 20404, f"The requested resource {request.path} was not found")
    return web.json_response(resource(message, account_sid))


def _parse_date(value: str) -> tuple[datetime, bool]:
    """A DateSent filter value: (moment, whether only a day was given)."""
    if len(value) == 10:
        day = datetime.strptime(value, "%Y-%m-%d").replace(tzinfo=UTC)
        return day, True
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)), False


def _date_filters(query: Any) -> list[Callable[[datetime], bool]]:
    """Predicates on date_sent (whole seconds, as Twilio shows it); `>` and `<` are inclusive."""
    checks: list[Callable[[datetime], bool]] = []
    for key, op in (("DateSent", ""), ("DateSent>", ">="), ("DateSent<", "<=")):
        raw = query.get(key)
        if not raw:
            continue
        if key == "DateSent" and raw[:2] in ("<=", ">="):  # Twilio also accepts DateSent=>=YYYY-MM-DD
            op, raw = raw[:2], raw[2:]
        moment, day_only = _parse_date(raw)
        span = timedelta(days=1) if day_only else timedelta(seconds=1)
        if op == ">=":
            checks.append(lambda sent, lo=moment: sent >= lo)
        elif op == "<=":
            checks.append(lambda sent, hi=moment + span: sent < hi)
        else:
            checks.append(lambda sent, lo=moment, hi=moment + span: lo <= sent < hi)
    return checks


async def list_messages(request: web.Request) -> web.Response:
    refusal = _guard(request)
    if refusal is not None:
        return refusal
    query = request.query
    account_sid = request.match_info["account_sid"]
    try:
        checks = _date_filters(query)
        page_size = min(int(query.get("PageSize", DEFAULT_PAGE_SIZE)), MAX_PAGE_SIZE)
        page = int(query.get("Page", 0))
        # The page token is the position after which the page starts, so paging stays stable
        # while new messages keep arriving at the top.
        token = query.get("PageToken")
        if token and not token.startswith("PA"):
            raise ValueError("unknown PageToken")
        after_seq = int(token[2:], 16) if token else None
        if page_size < 1 or page < 0:
            raise ValueError("PageSize and Page must be positive")
    except (ValueError, TypeError) as exc:
        return twilio_error(400, 20001, f"Invalid parameter: {exc}")
    to, from_ = query.get("To"), query.get("From")
    matches = [
        m
        for m in reversed(request.app[STATE_KEY].messages.values())
        if m.provider == PROVIDER
        and (to is None or m.to == to)
        and (from_ is None or m.from_ == from_)
        and all(check(m.created_at.replace(microsecond=0)) for check in checks)
    ]
    if after_seq is None:
        first = page * page_size
    else:  # matches are newest first, so seq decreases along the list
        first = next((i for i, m in enumerate(matches) if m.seq < after_seq), len(matches))
    items = matches[first : first + page_size]
    more = first + page_size < len(matches)

    filters = {k: v for k, v in query.items() if k not in ("Page", "PageSize", "PageToken")}
    path = f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"

    def page_uri(number: int, page_token: str | None = None) -> str:
        params = {**filters, "PageSize": page_size, "Page": number}
        if page_token:
            params["PageToken"] = page_token
        return f"{path}?{urlencode(params)}"

    start = page * page_size
    return web.json_response(
        {
            "messages": [resource(m, account_sid) for m in items],
            "page": page,
            "page_size": page_size,
            "start": start,
            "end": start + max(len(items) - 1, 0),
            "first_page_uri": page_uri(0),
            "previous_page_uri": page_uri(page - 1) if page > 0 else None,
            "next_page_uri": page_uri(page + 1, f"PA{items[-1].seq:x}") if more else None,
            "uri": page_uri(page, token),
        }
    )


def register(app: web.Application) -> None:
    """Add the Twilio routes; sibling emulations (vonage_api, mailgun_api) follow the same shape."""
    app.router.add_post(f"{BASE}/Messages.json", create_message)
    app.router.add_get(f"{BASE}/Messages.json", list_messages)
    app.router.add_get(f"{BASE}/Messages/{{sid}}.json", fetch_message)
