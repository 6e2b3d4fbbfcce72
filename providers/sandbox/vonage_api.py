"""Vonage's SMS API (POST /sms/json), its synchronous Reports API and signed delivery receipts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import re
import uuid
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web

from providers.sandbox.receipts import Encoded, form_body, schedule_status_callbacks
from providers.sandbox.retries import VONAGE
from providers.sandbox.state import (
    CONFIG_KEY,
    FAULT_AUTH,
    FAULT_INVALID,
    FAULT_OPTED_OUT,
    FAULT_OUTAGE,
    FAULT_RATE_429,
    STATE_KEY,
    SandboxConfig,
    StoredMessage,
    utcnow,
)

PROVIDER = "vonage"
SMS_PATH = "/sms/json"
RECORDS_PATH = "/v2/reports/records"
MSISDN = re.compile(r"^\d{7,15}$")
# The SMS API refuses a longer `callback` (the SDK's SmsMessage enforces the same limit).
CALLBACK_MAX_LENGTH = 100
# The synchronous Reports API answers at most this many records, then TRUNCATED with a cursor.
RECORDS_PAGE_SIZE = 1000
# ... and a date query may span at most one day.
RECORDS_MAX_WINDOW = timedelta(hours=24)
NETWORK = "310260"
MESSAGE_PRICE = "0.00570000"
REMAINING_BALANCE = "10.00000000"
# The sandbox's receipt_status -> Vonage DLR (status, err-code); SMS has no read receipts.
RECEIPTS = {
    "delivered": ("delivered", "0"),
    "read": ("delivered", "0"),
    "undelivered": ("failed", "12"),
    "failed": ("rejected", "9"),
    # Not a receipt_status: what a message whose ttl ran out before its delivery ends as. Vonage
    # documents the `expired` DLR status, not an err-code for it: 1 ("Unknown") is the sandbox's.
    "expired": ("expired", "1"),
}
ERROR_DESCRIPTIONS = {"0": "Delivered", "1": "Unknown", "9": "Illegal Number", "12": "Destination unreachable"}
# The SMS API's ttl range in milliseconds (20 s to 7 days; 72 h without it).
TTL_RANGE_MS = (20_000, 604_800_000)
# What a message not yet final shows in the Reports API.
PENDING_STATUS = "accepted"
# Intermediate DLR statuses (the carrier has it, not yet final):
# https://api.support.vonage.com/hc/en-us/articles/115007053127
INTERMEDIATE_STATUSES = frozenset({"accepted", "buffered"})
FORM_HEADERS = {"Content-Type": "application/x-www-form-urlencoded"}


# --- wire helpers ----------------------------------------------------------------------------------
def sms_response(messages: list[dict[str, str]]) -> web.Response:
    """The SMS API answers 200 even for a refused message; the per-message `status` says why."""
    return web.json_response({"message-count": str(len(messages)), "messages": messages})


def sms_error(status: str, text: str) -> web.Response:
    return sms_response([{"status": status, "error-text": text}])


def problem(
    status: int, title: str, detail: str, *, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """Vonage's newer APIs (and its gateway) answer errors as RFC 7807 problem documents."""
    slug = title.lower().replace(" ", "-")
    payload = {
        "type": f"https://developer.nexmo.com/api-errors#{slug}",
        "title": title,
        "detail": detail,
        "instance": uuid.uuid4().hex,
        **extra,
    }
    return web.json_response(payload, status=status, headers=headers)


def signature(params: dict[str, Any], secret: str, method: str) -> str:
    """Vonage's request/webhook signature, written from its documentation rather than taken from the SDK.

    Every parameter but `sig`, sorted by name, as `&name=value` with `&` and `=` in values replaced by
    `_`; then MD5 of that text followed by the secret (`md5hash`), or an HMAC of it keyed with the
    secret (`md5`, `sha1`, `sha256`, `sha512`). Hex digest.
    """
    text = "".join(
        f"&{key}={str(params[key]).replace('&', '_').replace('=', '_')}" for key in sorted(params) if key != "sig"
    )
    if method == "md5hash":
        return hashlib.md5((text + secret).encode()).hexdigest()
    return hmac.new(secret.encode(), text.encode(), getattr(hashlib, method)).hexdigest()


def vonage_time(moment: datetime) -> str:
    # The Reports API's format, e.g. "2019-06-28T15:30:00+0000".
    return moment.strftime("%Y-%m-%dT%H:%M:%S%z")


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    # Decoded by hand: aiohttp 3.14 deprecates BasicAuth.
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        login, _, password = base64.b64decode(encoded, validate=True).decode("latin-1").partition(":")
    except ValueError:  # binascii.Error is a ValueError
        return None
    return login, password


def _same_credentials(given: tuple[str, str], config: SandboxConfig) -> bool:
    key, secret = given
    return hmac.compare_digest(key.encode(), config.vonage_api_key.encode()) & hmac.compare_digest(
        secret.encode(), config.vonage_api_secret.encode()
    )


def _attribution(client_ref: str | None) -> tuple[str | None, str | None]:
    # Our adapter puts its send token, "<message id>.<generation>", in client-ref.
    if not client_ref:
        return None, None
    message_id = client_ref.rpartition(".")[0] or client_ref
    return message_id, client_ref


def _vonage_status(message: StoredMessage, now: datetime) -> tuple[str, str | None]:
    current = message.status_at(now)
    if current == "sent":
        return PENDING_STATUS, None
    return RECEIPTS[current]


# --- POST /sms/json ------------------------------------------------------------------------------------
async def _sms_params(request: web.Request) -> dict[str, str]:
    """The request's parameters: the SMS API takes a form or a JSON object."""
    if request.content_type == "application/json":
        payload = json.loads(await request.read() or b"{}")
        if not isinstance(payload, dict):
            raise ValueError("body must be a JSON object")
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in payload.items()}
    form = await request.post()
    return {key: str(value) for key, value in form.items()}


def _credentials_refusal(request: web.Request, params: dict[str, str]) -> web.Response | None:
    """Basic auth (what the v4 SDK sends) or api_key/api_secret in the body, as the real API takes."""
    config = request.app[CONFIG_KEY]
    given = _basic_credentials(request)
    if given is None and "api_key" in params:
        given = (params["api_key"], params.get("api_secret", ""))
    if given is None:
        return sms_error("2", "Missing api_key")
    if not _same_credentials(given, config):
        return sms_error("4", "Bad Credentials")
    return None


def _invalid(params: dict[str, str]) -> tuple[str, str] | None:
    for name in ("from", "to", "text"):
        if not params.get(name):
            return "2", f"Missing {name} param"
    if not MSISDN.match(params["to"].removeprefix("+")):
        return "3", "Invalid to address"
    if params.get("ttl") is not None and _ttl_ms(params) is None:
        return "3", "Invalid Parameters: ttl"
    callback = params.get("callback")
    if callback and (len(callback) > CALLBACK_MAX_LENGTH or not callback.startswith(("http://", "https://"))):
        return "23", "Invalid Callback Url"
    return None


def _ttl_ms(params: dict[str, str]) -> int | None:
    """The request's ttl in milliseconds, None when absent or not a whole number in range."""
    try:
        value = int(params.get("ttl") or "")
    except ValueError:
        return None
    return value if TTL_RANGE_MS[0] <= value <= TTL_RANGE_MS[1] else None


class DeliveryReceipts:
    """Vonage's delivery receipt (DLR) wire format, signed with the account's signature secret."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = config

    def params(self, message: StoredMessage, status: str) -> dict[str, str]:
        """A signed DLR with Vonage `status`; the same for every attempt (its nonce is the callback's)."""
        config = self.config
        intermediate = status in INTERMEDIATE_STATUSES
        at = message.created_at if intermediate or message.final_at is None else message.final_at
        err_code = "0" if intermediate or message.final_status is None else RECEIPTS[message.final_status][1]
        params = {
            "msisdn": message.to,
            "to": message.from_,
            "network-code": NETWORK,
            "messageId": message.provider_message_id,
            "price": MESSAGE_PRICE,
            "status": status,
            "scts": at.strftime("%y%m%d%H%M"),
            "err-code": err_code,
            "api-key": config.vonage_api_key,
            "message-timestamp": at.strftime("%Y-%m-%d %H:%M:%S"),
            "timestamp": str(int(at.timestamp())),
            "nonce": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{message.provider_message_id}/{status}")),
        }
        if message.extra.get("client_ref"):
            params["client-ref"] = message.extra["client_ref"]
        params["sig"] = signature(params, config.vonage_signature_secret, config.vonage_signature_method)
        return params

    def encode(self, message: StoredMessage, status: str) -> Encoded:
        return form_body(self.params(message, status)), FORM_HEADERS


def callback_statuses(final_status: str) -> list[str]:
    """The DLRs Vonage posts for a message the sandbox ends in `final_status`, in Vonage's words:
    an intermediate `accepted` once the carrier takes it, then the final one; a message the
    carrier rejects up front gets only `rejected`."""
    status = RECEIPTS[final_status][0]
    return [status] if status == "rejected" else ["accepted", status]


async def send_sms(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        params = await _sms_params(request)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return sms_error("2", "Missing Parameters: the body is not a JSON object")
    to, text = params.get("to"), params.get("text")
    digits = (to or "").removeprefix("+")
    logged_to = f"+{digits}" if digits.isdigit() else to  # E.164 in the log, as every provider logs it
    message_id, token = _attribution(params.get("client-ref"))

    attribution = {
        "provider": PROVIDER,
        "channel": "sms",
        "message_id": message_id,
        "token": token,
        "to": logged_to,
        "body": text,
        # The ttl the request gave, as sent (None: Vonage's default, 72 h).
        "fields": {"ttl": params.get("ttl")},
    }

    async def refuse(response: web.Response, fault: str, delay_s: float) -> web.Response:
        return await state.refuse(response, fault=fault, delay_s=delay_s, **attribution)

    if state.faults[PROVIDER].outage:
        unavailable = problem(503, "Service Unavailable", "The service is temporarily unavailable.")
        return await refuse(unavailable, FAULT_OUTAGE, state.latency_s(PROVIDER))
    refusal = _credentials_refusal(request, params)
    if refusal is not None:
        return await refuse(refusal, FAULT_AUTH, state.latency_s(PROVIDER))
    invalid = _invalid(params)
    if invalid is not None:
        return await refuse(sms_error(*invalid), FAULT_INVALID, state.latency_s(PROVIDER))
    if state.is_opted_out(PROVIDER, logged_to):
        # The SMS API's answer for a number on the block list (a STOP puts it there): status 7.
        barred = sms_error("7", "Number Barred: the number you are trying to send messages to is barred")
        return await refuse(barred, FAULT_OPTED_OUT, state.latency_s(PROVIDER))

    outcome = state.draw_send_outcome(PROVIDER, logged_to)
    if outcome.refusal == FAULT_RATE_429:
        # The gateway's per-second limit; status "1" (throttled) is the account's message rate.
        limited = problem(429, "Too Many Requests", "Rate limit exceeded.", headers={"Retry-After": "1"})
        return await refuse(limited, outcome.refusal, outcome.response_delay_s)
    if outcome.refusal:
        return await refuse(sms_error("5", "Internal Error"), outcome.refusal, outcome.response_delay_s)

    # Accepted: stored, logged and its receipt queued before the (possibly held) answer, because a
    # client that times out has still caused a send; that is the ambiguous case to reconcile.
    message = state.store_message(
        provider=PROVIDER,
        provider_message_id=str(uuid.uuid4()),
        channel="sms",
        to=digits,
        from_=params["from"],
        body=params["text"],
        message_id=message_id,
        token=token,
        callback_url=params.get("callback") or None,
        outcome=outcome,
        extra={"client_ref": params.get("client-ref")},
    )
    state.record_request(
        **attribution,
        accepted=True,
        status_code=200,
        provider_message_id=message.provider_message_id,
        fault=outcome.fault,
    )
    # Not delivered when its ttl ends: the `expired` DLR, at that moment.
    ttl_ms = _ttl_ms(params)
    state.expire_after(message, None if ttl_ms is None else ttl_ms / 1000, status="expired")
    if message.callback_url:
        schedule_status_callbacks(
            request.app,
            provider=PROVIDER,
            message=message,
            delivery=outcome.delivery,
            url=message.callback_url,
            statuses=callback_statuses(message.final_status or "delivered"),
            final_only_status=RECEIPTS[message.final_status][0] if message.final_status else None,
            intermediate=INTERMEDIATE_STATUSES,
            policy=VONAGE,
        )
    accepted = {
        "to": digits,
        "message-id": message.provider_message_id,
        "status": "0",
        "remaining-balance": REMAINING_BALANCE,
        "message-price": MESSAGE_PRICE,
        "network": NETWORK,
    }
    if params.get("client-ref"):
        accepted["client-ref"] = params["client-ref"]
    await asyncio.sleep(outcome.response_delay_s)
    return sms_response([accepted])


# --- GET /v2/reports/records ------------------------------------------------------------------------
class _Unprocessable(ValueError):
    """A records query the Reports API refuses with 422."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name


def _parse_time(name: str, value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _Unprocessable(name, "Invalid date format, expected yyyy-mm-ddThh:mm:ss[.sss]±hh:mm") from None
    if moment.tzinfo is None:
        raise _Unprocessable(name, "The date needs a time zone offset")
    return moment


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        kind, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if kind != "seq":
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, binascii.Error):
        raise _Unprocessable("cursor", "Invalid cursor") from None


def record(message: StoredMessage, account_id: str, now: datetime, *, include_message: bool) -> dict[str, Any]:
    """One SMS (outbound) record as the synchronous Reports API shows it."""
    status, err_code = _vonage_status(message, now)
    final = status != PENDING_STATUS
    row: dict[str, Any] = {
        "account_id": account_id,
        "message_id": message.provider_message_id,
        "client_ref": message.extra.get("client_ref"),
        "direction": "outbound",
        "from": message.from_,
        "to": message.to,
        "network": NETWORK,
        "status": status,
        "error_code": err_code,
        "error_code_description": ERROR_DESCRIPTIONS.get(err_code or ""),
        "date_received": vonage_time(message.created_at),
        "date_finalized": vonage_time(message.updated_at(now)) if final else None,
        "latency": int((message.updated_at(now) - message.created_at).total_seconds() * 1000) if final else None,
        "currency": "EUR",
        "total_price": MESSAGE_PRICE,
        "concatenated": False,
    }
    if include_message:
        row["message_body"] = message.body
    return row


def _select(request: web.Request, now: datetime) -> tuple[list[StoredMessage], list[str], int | None]:
    """The messages a records query asks for: (page, ids not found, seq to continue after or None)."""
    query = request.query
    for name in ("product", "direction"):
        if not query.get(name):
            raise _Unprocessable(name, "Missing required parameter")
    if query["product"] != "SMS":
        raise _Unprocessable("product", "The sandbox keeps SMS records only")
    if query["direction"] not in ("outbound", "inbound"):
        raise _Unprocessable("direction", "Must be inbound or outbound")
    messages = [m for m in request.app[STATE_KEY].messages.values() if m.provider == PROVIDER]
    if query["direction"] == "inbound":  # the sandbox receives no SMS
        messages = []
    if query.get("id"):
        if any(query.get(name) for name in ("date_start", "date_end", "status")):
            raise _Unprocessable(
                "id", "When using id, the following parameters are not supported: [date_start, date_end, status]"
            )
        by_id = {m.provider_message_id: m for m in messages}
        ids = [i for i in query["id"].split(",") if i]
        return [by_id[i] for i in ids if i in by_id], [i for i in ids if i not in by_id], None
    for name in ("date_start", "date_end"):
        if not query.get(name):
            raise _Unprocessable(name, "Missing required parameter")
    start, end = _parse_time("date_start", query["date_start"]), _parse_time("date_end", query["date_end"])
    if not timedelta(0) < end - start <= RECORDS_MAX_WINDOW:
        raise _Unprocessable("date_end", "date_end must be after date_start and no more than 24 hours later")
    after = _decode_cursor(query["cursor"]) if query.get("cursor") else 0
    if query.get("cursor") and not query.get("iv"):
        raise _Unprocessable("iv", "Missing required parameter")
    status = query.get("status")
    matches = sorted(
        (
            m
            for m in messages
            if start <= m.created_at < end and m.seq > after and (not status or _vonage_status(m, now)[0] == status)
        ),
        key=lambda m: m.seq,
    )
    page = matches[:RECORDS_PAGE_SIZE]
    return page, [], page[-1].seq if len(matches) > RECORDS_PAGE_SIZE else None


async def list_records(request: web.Request) -> web.Response:
    config, state = request.app[CONFIG_KEY], request.app[STATE_KEY]
    if state.faults[PROVIDER].outage:
        return problem(503, "Service Unavailable", "The service is temporarily unavailable.")
    given = _basic_credentials(request)
    if given is None or not _same_credentials(given, config):
        return problem(401, "Unauthorized", "You did not provide correct credentials.")
    if not request.query.get("account_id"):
        return problem(
            422,
            "Unprocessable entity",
            "Missing parameter",
            invalid_parameters=[{"name": "account_id", "reason": "Missing required parameter"}],
        )
    if request.query["account_id"] != config.vonage_api_key:
        return problem(403, "Forbidden", "User not authorized to query the requested data")
    now = utcnow()
    try:
        page, not_found, continue_after = _select(request, now)
    except _Unprocessable as exc:
        return problem(
            422, "Unprocessable entity", str(exc), invalid_parameters=[{"name": exc.name, "reason": str(exc)}]
        )
    include_message = request.query.get("include_message") == "true"
    links: dict[str, Any] = {"self": {"href": str(request.url)}}
    if continue_after is not None:
        # The real cursor is encrypted (hence its iv); the sandbox's only needs to be opaque.
        token = {"cursor": _encode_cursor(continue_after), "iv": uuid.uuid4().hex}
        links["next"] = {"href": str(request.url.update_query(token))}
    payload: dict[str, Any] = {
        "_links": links,
        "request_id": str(uuid.uuid4()),
        "request_status": "TRUNCATED" if continue_after is not None else "SUCCESS",
        "received_at": vonage_time(now),
        "price": 0,
        "currency": "EUR",
        "account_id": config.vonage_api_key,
        "product": "SMS",
        "direction": request.query["direction"],
        "include_message": include_message,
        "items_count": len(page),
        "records": [record(m, config.vonage_api_key, now, include_message=include_message) for m in page],
    }
    if not_found:
        payload["ids_not_found"] = ",".join(not_found)
    return web.json_response(payload)


def register(app: web.Application) -> None:
    """Add the Vonage routes at the real API's paths (rest.nexmo.com and api.nexmo.com share the sandbox)."""
    app.router.add_post(SMS_PATH, send_sms)
    app.router.add_get(RECORDS_PATH, list_records)
