"""Mailgun's v3 Messages and Events API wire format, and its signed tracking webhooks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from datetime import datetime, timedelta
from email.utils import getaddresses, parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from providers.sandbox.receipts import RECEIPTS_KEY, Encoded
from providers.sandbox.retries import FINAL_ONLY, MAILGUN
from providers.sandbox.state import (
    CONFIG_KEY,
    DELIVERY_RECEIPT,
    FAULT_AUTH,
    FAULT_ERROR,
    FAULT_INVALID,
    FAULT_OUTAGE,
    FAULT_RATE_429,
    STATE_KEY,
    SandboxConfig,
    StoredMessage,
    utcnow,
)

PROVIDER = "mailgun"
BASE = "/v3/{domain}"
# Mailgun's webhooks are configured per domain, not per message, so the receiver is not in the
# request: it is the sandbox's public URL (POST /_sandbox/config changes it at runtime).
TRACKING_PATH = "/webhooks/anymail/mailgun/tracking/"
DEFAULT_LIMIT = 100  # Mailgun's page size when `limit` is omitted
MAX_LIMIT = 300
# Least gap between a message's successive events (accepted, delivered, opened): a person opens
# an email a while after it arrived, and two webhooks posted together race at the receiver.
EVENT_SPACING = timedelta(milliseconds=250)
REFUSALS = {
    FAULT_OUTAGE: (503, "Service Unavailable"),
    FAULT_RATE_429: (429, "Too many requests"),
    FAULT_ERROR: (500, "Internal Server Error"),
}
VARIABLES_HEADER = "h:X-Mailgun-Variables"
JSON_HEADERS = {"Content-Type": "application/json"}
# Query parameters of GET /events that the sandbox understands; anything else is refused (400), so
# an adapter relying on a filter the emulation ignores fails here instead of in production.
EVENT_FILTERS = ("event", "message-id", "recipient", "to", "from", "subject", "severity", "tags", "user-variables")
EVENT_PARAMS = frozenset({"begin", "end", "ascending", "limit", "pretty", *EVENT_FILTERS})

# What each final sandbox status looks like in Mailgun's vocabulary: (event, extra event-data).
OUTCOMES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "delivered": [("delivered", {})],
    "read": [("delivered", {}), ("opened", {})],
    # A hard bounce: anymail normalises a permanent `failed` to `bounced`.
    "undelivered": [
        (
            "failed",
            {
                "severity": "permanent",
                "reason": "bounce",
                "delivery-status": {
                    "code": 550,
                    "message": "5.1.1 The email account that you tried to reach does not exist.",
                    "description": "",
                    "attempt-no": 1,
                },
            },
        )
    ],
    # Mailgun refused to send it at all (e.g. a suppressed address): anymail's `rejected`.
    "failed": [("rejected", {"reject": {"reason": "suppress-complaint", "description": "previously complained"}})],
    # A recipient's own outcomes (FaultSettings.recipient_outcomes). A soft bounce: a temporary
    # `failed` (anymail's `deferred`), then Mailgun's retry delivers it.
    "soft_bounce": [
        (
            "failed",
            {
                "severity": "temporary",
                "reason": "generic",
                "delivery-status": {
                    "code": 452,
                    "message": "4.2.2 The email account that you tried to reach is over quota.",
                    "description": "",
                    "attempt-no": 1,
                    "retry-seconds": 600,
                },
            },
        ),
        ("delivered", {}),
    ],
    "complained": [("delivered", {}), ("complained", {})],
    "unsubscribed": [("delivered", {}), ("unsubscribed", {})],
}
# recipient_outcomes' names -> OUTCOMES' (a hard bounce is the `undelivered` outcome).
FEEDBACK_OUTCOMES = {
    "hard_bounce": "undelivered",
    "soft_bounce": "soft_bounce",
    "complained": "complained",
    "unsubscribed": "unsubscribed",
}


def mailgun_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"message": message}, status=status, headers=headers)


def event_id(provider_message_id: str, event: str) -> str:
    """A stable 22-character id per (message, event), like Mailgun's, so webhook and Events API agree."""
    digest = hashlib.sha256(f"{provider_message_id}|{event}".encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign(signing_key: str, timestamp: str, token: str) -> str:
    """Mailgun's webhook signature: hex HMAC-SHA256 of timestamp + token with the signing key."""
    return hmac.new(signing_key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()


def webhook_url(app: web.Application) -> str:
    base = app[STATE_KEY].public_url or app[CONFIG_KEY].public_url
    return base.rstrip("/") + TRACKING_PATH


def _authorized(request: web.Request) -> bool:
    # Decoded by hand: aiohttp 3.14 deprecates BasicAuth. Mailgun's user name is always "api".
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    try:
        login, _, password = base64.b64decode(encoded, validate=True).decode("latin-1").partition(":")
    except ValueError:  # binascii.Error is a ValueError
        return False
    api_key = request.app[CONFIG_KEY].mailgun_api_key
    return (
        scheme.lower() == "basic"
        and hmac.compare_digest(login.encode(), b"api")
        and hmac.compare_digest(password.encode(), api_key.encode())
    )


def _guard(request: web.Request) -> web.Response | None:
    """Outage, credentials and domain: the checks the Events API shares with sending."""
    if request.app[STATE_KEY].faults[PROVIDER].outage:
        return mailgun_error(*REFUSALS[FAULT_OUTAGE])
    if not _authorized(request):
        return web.Response(status=401, text="Forbidden")  # Mailgun answers plain text here
    domain = request.match_info["domain"]
    if domain != request.app[CONFIG_KEY].mailgun_domain:
        return mailgun_error(404, f"Domain not found: {domain}")
    return None


def _valid_address(address: str) -> bool:
    """One @ and a dot in the domain: enough to tell a typo from an address."""
    local, _, domain = address.partition("@")
    return address.count("@") == 1 and bool(local) and "." in domain.strip(".")


def _recipients(form: Any) -> list[str]:
    # Mailgun takes `to` repeated or comma-separated, each possibly with a display name.
    return [address for _, address in getaddresses(form.getall("to", []))]


def _invalid(form: Any) -> str | None:
    if not form.get("from"):
        return "from parameter is missing"
    recipients = _recipients(form)
    if not recipients:
        return "to parameter is missing"
    if not all(_valid_address(address) for address in recipients):
        return "to parameter is not a valid address. please check documentation"
    if not (form.get("text") or form.get("html") or form.get("template")):
        return "Need at least one of 'text', 'html' or 'template' parameters specified"
    return None


def _user_variables(form: Any) -> dict[str, Any]:
    """Custom data: the JSON X-Mailgun-Variables header, then `v:` fields (which win, as in Mailgun)."""
    variables: dict[str, Any] = {}
    try:
        header = json.loads(form.get(VARIABLES_HEADER) or "{}")
    except ValueError:
        header = {}
    if isinstance(header, dict):
        variables.update(header)
    variables.update({key[2:]: value for key, value in form.items() if key.startswith("v:")})
    return variables


def _headers(form: Any) -> dict[str, str]:
    """The extra MIME headers of a send: Mailgun's `h:Name` fields (its own X-Mailgun-Variables aside)."""
    return {key[2:]: value for key, value in form.items() if key.startswith("h:") and key != VARIABLES_HEADER}


def _new_message_id(domain: str) -> str:
    return f"<{utcnow():%Y%m%d%H%M%S}.{uuid.uuid4().hex[:20].upper()}@{domain}>"


# --- events -----------------------------------------------------------------------------------
def timeline(message: StoredMessage) -> list[tuple[str, datetime, dict[str, Any]]]:
    """Every event this message has or will have: (Mailgun event, when, extra event-data)."""
    events: list[tuple[str, datetime, dict[str, Any]]] = [("accepted", message.created_at, {})]
    if message.final_status and message.final_at is not None:
        start = max(message.final_at, message.created_at + EVENT_SPACING)
        for position, (name, extra) in enumerate(OUTCOMES[message.final_status]):
            events.append((name, start + position * EVENT_SPACING, extra))
    return events


def event_data(message: StoredMessage, name: str, at: datetime, extra: dict[str, Any]) -> dict[str, Any]:
    """One event as Mailgun shows it in the Events API and in a webhook's `event-data`."""
    recipient = message.to
    data: dict[str, Any] = {
        "id": event_id(message.provider_message_id, name),
        "timestamp": at.timestamp(),
        "event": name,
        "log-level": {"failed": "error", "rejected": "warn"}.get(name, "info"),
        "recipient": recipient,
        "recipient-domain": recipient.partition("@")[2],
        "message": {
            "headers": {
                "to": message.extra.get("to_header", recipient),
                "from": message.from_,
                "subject": message.extra.get("subject", ""),
                "message-id": message.provider_message_id.strip("<>"),
            },
            "attachments": [],
            "size": len(message.body.encode()),
        },
        "envelope": {"transport": "smtp", "sender": message.from_, "targets": recipient},
        "flags": {"is-authenticated": True, "is-test-mode": False, "is-routed": False},
        "tags": message.extra.get("tags", []),
        "campaigns": [],
        "user-variables": message.extra.get("user_variables", {}),
        **extra,
    }
    if name == "accepted":
        data["method"] = "HTTP"  # accepted through the HTTP API, not SMTP
    if name == "delivered":
        data["delivery-status"] = {"code": 250, "message": "OK", "description": "", "attempt-no": 1, "tls": True}
    if name == "opened":
        data["ip"] = "192.0.2.10"
        data["client-info"] = {"client-type": "browser", "client-name": "Firefox", "user-agent": "Mozilla/5.0"}
    return data


class TrackingWebhooks:
    """Mailgun's webhook wire format: the event as JSON, signed afresh for every attempt."""

    def __init__(self, config: SandboxConfig) -> None:
        self.signing_key = config.mailgun_webhook_signing_key

    def encode(self, message: StoredMessage, name: str) -> Encoded:
        at, extra = next((at, extra) for event, at, extra in timeline(message) if event == name)
        timestamp, token = str(int(time.time())), secrets.token_hex(25)  # Mailgun's tokens are 50 chars
        body = {
            "signature": {
                "timestamp": timestamp,
                "token": token,
                "signature": sign(self.signing_key, timestamp, token),
            },
            "event-data": event_data(message, name, at, extra),
        }
        return json.dumps(body).encode(), JSON_HEADERS


def _schedule_receipts(request: web.Request, message: StoredMessage, delivery: str) -> None:
    """Queue the message's tracking webhooks, one per event, at the events' times.

    realistic: `accepted` at once, then the outcome's events (none for a dropped message or a
    lost receipt); final_only: the outcome's events only, as the sandbox always did."""
    assert message.callback_url
    faults = request.app[STATE_KEY].faults[PROVIDER]
    events = timeline(message)
    if faults.callback_mode == "final_only":
        events = events[1:] if delivery == DELIVERY_RECEIPT else []
        policy = FINAL_ONLY
    else:
        events = events if delivery == DELIVERY_RECEIPT else events[:1]
        policy = MAILGUN
    now = utcnow()
    request.app[RECEIPTS_KEY].schedule(
        provider=PROVIDER,
        url=message.callback_url,
        message=message,
        steps=[(name, max(0.0, (at - now).total_seconds())) for name, at, _ in events],
        policy=policy,
    )


# --- sending ----------------------------------------------------------------------------------
async def send_message(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    form = await request.post()  # anymail sends urlencoded, or multipart with attachments
    variables = _user_variables(form)
    message_id, token = variables.get("conductor_message_id"), variables.get("conductor_token")
    recipients = _recipients(form)
    to = recipients[0] if recipients else None
    body = form.get("text") or form.get("html")

    attribution = {
        "provider": PROVIDER,
        "channel": "email",
        "message_id": message_id,
        "token": token,
        "to": to,
        "body": body,
    }

    async def refuse(response: web.Response, fault: str, delay_s: float) -> web.Response:
        return await state.refuse(response, fault=fault, delay_s=delay_s, **attribution)

    refusal = _guard(request)
    if refusal is not None:
        fault = {503: FAULT_OUTAGE, 401: FAULT_AUTH}.get(refusal.status, FAULT_INVALID)
        return await refuse(refusal, fault, state.latency_s(PROVIDER))
    invalid = _invalid(form)
    if invalid is not None:
        return await refuse(mailgun_error(400, invalid), FAULT_INVALID, state.latency_s(PROVIDER))

    outcome = state.draw_send_outcome(PROVIDER)
    if outcome.refusal:
        headers = {"Retry-After": "1"} if outcome.refusal == FAULT_RATE_429 else None
        return await refuse(
            mailgun_error(*REFUSALS[outcome.refusal], headers=headers), outcome.refusal, outcome.response_delay_s
        )

    # Accepted: stored, logged and its webhooks queued before the (possibly held) answer, because
    # a client that times out has still caused a send; that is the ambiguous case to reconcile.
    domain = request.match_info["domain"]
    message = state.store_message(
        provider=PROVIDER,
        provider_message_id=_new_message_id(domain),
        channel="email",
        to=to or "",
        from_=form.get("from") or "",
        body=body or "",
        message_id=message_id,
        token=token,
        callback_url=webhook_url(request.app),
        outcome=outcome,
        extra={
            "subject": form.get("subject") or "",
            "to_header": ", ".join(form.getall("to")),
            "tags": form.getall("o:tag", []),
            "user_variables": variables,
        },
    )
    feedback = state.faults[PROVIDER].recipient_outcomes.get((to or "").lower())
    if feedback and message.final_status is not None:  # a dropped message has no outcome at all
        message.final_status = FEEDBACK_OUTCOMES[feedback]
    state.record_request(
        **attribution,
        accepted=True,
        status_code=200,
        provider_message_id=message.provider_message_id,
        fault=outcome.fault,
        headers=_headers(form),
    )
    _schedule_receipts(request, message, outcome.delivery)
    await asyncio.sleep(outcome.response_delay_s)
    return web.json_response({"id": message.provider_message_id, "message": "Queued. Thank you."})


# --- Events API -------------------------------------------------------------------------------
def _moment(value: str) -> float:
    """A time-range bound: epoch seconds or RFC 2822, as Mailgun accepts both."""
    try:
        return float(value)
    except ValueError:
        return parsedate_to_datetime(value).timestamp()


def _encode_page(query: dict[str, str], cursor: tuple[float, str] | None, ascending: bool) -> str:
    """A page URL's last segment: the query, where the page starts (exclusive) and the direction."""
    raw = json.dumps({"q": query, "c": list(cursor) if cursor else None, "a": ascending}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page(token: str) -> tuple[dict[str, str], tuple[float, str] | None, bool]:
    raw = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    cursor = (float(raw["c"][0]), str(raw["c"][1])) if raw["c"] else None
    return raw["q"], cursor, bool(raw["a"])


def _matches(data: dict[str, Any], query: dict[str, str], wanted_variables: dict[str, Any]) -> bool:
    headers = data["message"]["headers"]
    checks = {
        "event": lambda v: data["event"] in {part.strip() for part in v.split(" OR ")},
        "message-id": lambda v: headers["message-id"] == v.strip("<>"),
        "recipient": lambda v: data["recipient"].lower() == v.lower(),
        "to": lambda v: v.lower() in headers["to"].lower(),
        "from": lambda v: v.lower() in headers["from"].lower(),
        "subject": lambda v: headers["subject"] == v,
        "severity": lambda v: data.get("severity") == v,
        "tags": lambda v: v in data["tags"],
    }
    if any(name in query and not check(query[name]) for name, check in checks.items()):
        return False
    variables = data["user-variables"]
    return all(variables.get(key) == value for key, value in wanted_variables.items())


async def list_events(request: web.Request) -> web.Response:
    refusal = _guard(request)
    if refusal is not None:
        return refusal
    state, domain = request.app[STATE_KEY], request.match_info["domain"]
    cursor: tuple[float, str] | None = None
    try:
        if "page" in request.match_info:
            query, cursor, ascending = _decode_page(request.match_info["page"])
        else:
            query = dict(request.query)
            unknown = set(query) - EVENT_PARAMS
            if unknown:
                raise ValueError(f"unsupported parameter(s): {', '.join(sorted(unknown))}")
            if query.get("ascending", "no") not in ("yes", "no"):
                raise ValueError("ascending: must be yes or no")
            ascending = query.get("ascending") == "yes"
            if "begin" in query and "end" in query:  # the bounds' order sets the direction
                ascending = _moment(query["begin"]) <= _moment(query["end"])
        limit = int(query.get("limit", DEFAULT_LIMIT))
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit: must be between 1 and {MAX_LIMIT}")
        begin = _moment(query["begin"]) if "begin" in query else None
        end = _moment(query["end"]) if "end" in query else None
        wanted_variables = json.loads(query.get("user-variables", "{}"))
        if not isinstance(wanted_variables, dict):
            raise ValueError("user-variables: must be a JSON object")
    except (ValueError, TypeError, KeyError) as exc:
        return mailgun_error(400, f"Invalid query: {exc}")

    now = utcnow()
    wanted_id = query.get("message-id")
    if wanted_id:  # the common look-up: one message's events, found without a scan
        stored = state.messages.get(f"<{wanted_id.strip('<>')}>")
        candidates = [stored] if stored is not None else []
    else:
        candidates = list(state.messages.values())
    low, high = (begin, end) if ascending else (end, begin)
    events = []
    for message in candidates:
        if message.provider != PROVIDER or not message.provider_message_id.endswith(f"@{domain}>"):
            continue
        for name, at, extra in timeline(message):
            stamp = at.timestamp()
            if at > now or (low is not None and stamp < low) or (high is not None and stamp > high):
                continue
            data = event_data(message, name, at, extra)
            if _matches(data, query, wanted_variables):
                events.append(((stamp, data["id"]), data))
    events.sort(key=lambda pair: pair[0], reverse=not ascending)
    if cursor is not None:
        events = [pair for pair in events if (pair[0] > cursor if ascending else pair[0] < cursor)]
    page = events[:limit]

    # As in Mailgun, all four links are always there; past either end they give an empty page.
    base = f"{request.url.origin()}{BASE.format(domain=domain)}/events"
    after_last = page[-1][0] if page else cursor
    before_first = page[0][0] if page else cursor
    return web.json_response(
        {
            "items": [data for _, data in page],
            "paging": {
                "first": f"{base}?{urlencode(query)}",
                "last": f"{base}/{_encode_page(query, None, not ascending)}",
                "next": f"{base}/{_encode_page(query, after_last, ascending)}",
                "previous": f"{base}/{_encode_page(query, before_first, not ascending)}",
            },
        }
    )


def register(app: web.Application) -> None:
    """Add the Mailgun routes; the same paths as api.mailgun.net under the sandbox's URL."""
    app.router.add_post(f"{BASE}/messages", send_message)
    app.router.add_get(f"{BASE}/events", list_events)
    app.router.add_get(f"{BASE}/events/{{page}}", list_events)
