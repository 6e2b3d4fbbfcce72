"""Inbound messages: the sandbox plays a recipient texting our number (STOP, START, HELP, anything).

`POST /_sandbox/inbound {"provider": "twilio"|"vonage", "from": "+1...", "body": "STOP"}` posts the
provider's inbound webhook, in its wire format and signed as it signs, to Conductor's inbound URL
(CONDUCTOR_PUBLIC_URL + /webhooks/<provider>/inbound/ unless the request names a "url"), and
answers with what that webhook answered (status, content type, body: Twilio's TwiML). Optional:
"to" (default the configured sender number), "channel" ("whatsapp" for Twilio's WhatsApp: it also
opens the number's customer-service window, so that free-form WhatsApp messages to it go for the
next 24 hours, as on Twilio).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web
from twilio.request_validator import RequestValidator

from providers.sandbox.receipts import form_body
from providers.sandbox.state import CONFIG_KEY, STATE_KEY, SandboxConfig, SandboxState
from providers.sandbox.vonage_api import signature as vonage_signature

INBOUND_PROVIDERS = ("twilio", "vonage")
INBOUND_PATH = "/webhooks/{provider}/inbound/"
E164 = re.compile(r"\+[1-9]\d{5,14}")
BODY_MAX_LENGTH = 1600
# The webhook's answer is awaited at most this long (Twilio waits 15 s for its webhooks).
POST_TIMEOUT_S = 15.0
# Vonage's "to" when the configured sender is an alphanumeric sender id (inbound needs a number).
VONAGE_DEFAULT_NUMBER = "12015550123"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


class InboundInvalid(ValueError):
    """A control request the sandbox refuses (400 naming the field)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def twilio_inbound(config: SandboxConfig, *, url: str, sender: str, to: str, body: str, channel: str):
    """(form fields, headers) of Twilio's incoming message request, signed over `url`."""
    sid = "SM" + uuid.uuid4().hex
    prefix = "whatsapp:" if channel == "whatsapp" else ""
    params = {
        "ToCountry": "US",
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "SmsSid": sid,
        "SmsStatus": "received",
        "Body": body,
        "To": prefix + to,
        "NumSegments": "1",
        "MessageSid": sid,
        "AccountSid": config.twilio_account_sid,
        "From": prefix + sender,
        "ApiVersion": "2010-04-01",
    }
    if channel == "whatsapp":
        params.update(ProfileName="Sandbox recipient", WaId=sender.removeprefix("+"), MessageType="text")
    else:
        params.update(FromCountry="US", SmsStatus="received")
    headers = {
        **FORM,
        "X-Twilio-Signature": RequestValidator(config.twilio_auth_token).compute_signature(url, params),
        "I-Twilio-Idempotency-Token": sid,  # the same on Twilio's retries of this webhook
    }
    return params, headers


def vonage_inbound(config: SandboxConfig, *, sender: str, to: str, body: str) -> tuple[dict[str, str], dict[str, str]]:
    """(form fields, headers) of Vonage's inbound SMS webhook, signed with the signature secret."""
    now = time.time()
    params = {
        "msisdn": sender.removeprefix("+"),
        "to": to.removeprefix("+"),
        "messageId": uuid.uuid4().hex[:16].upper(),
        "text": body,
        "type": "text" if body.isascii() else "unicode",
        "keyword": body.split()[0].upper() if body.split() else "",
        "api-key": config.vonage_api_key,
        "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
        "timestamp": str(int(now)),
        "nonce": str(uuid.uuid4()),
    }
    params["sig"] = vonage_signature(params, config.vonage_signature_secret, config.vonage_signature_method)
    return params, dict(FORM)


def inbound_request(payload: dict[str, Any], config: SandboxConfig) -> tuple[str, dict[str, str], dict[str, str]]:
    """(url, form fields, headers) of the webhook a control request asks for; InboundInvalid if bad."""
    unknown = sorted(set(payload) - {"provider", "from", "to", "body", "channel", "url"})
    if unknown:
        raise InboundInvalid(f"unknown field {unknown[0]!r}", unknown[0])
    provider = payload.get("provider")
    if provider not in INBOUND_PROVIDERS:
        raise InboundInvalid(f"provider must be one of {', '.join(INBOUND_PROVIDERS)}", "provider")
    sender = payload.get("from")
    if not isinstance(sender, str) or not E164.fullmatch(sender):
        raise InboundInvalid("from must be an E.164 number, e.g. +14155552671", "from")
    body = payload.get("body", "")
    if not isinstance(body, str) or len(body) > BODY_MAX_LENGTH:
        raise InboundInvalid(f"body must be text of at most {BODY_MAX_LENGTH} characters", "body")
    channel = payload.get("channel", "sms")
    if channel not in ("sms", "whatsapp") or (channel == "whatsapp" and provider != "twilio"):
        raise InboundInvalid("channel must be sms, or whatsapp for twilio", "channel")
    to = payload.get("to")
    if to is None:
        to = _default_to(config, provider, channel)
    elif not isinstance(to, str) or not to:
        raise InboundInvalid("to must be our number (text)", "to")
    url = payload.get("url")
    if url is None:
        url = config.inbound_base_url.rstrip("/") + INBOUND_PATH.format(provider=provider)
    elif not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InboundInvalid("url must be an http(s) URL", "url")
    if provider == "twilio":
        params, headers = twilio_inbound(config, url=url, sender=sender, to=to, body=body, channel=channel)
    else:
        params, headers = vonage_inbound(config, sender=sender, to=to, body=body)
    return url, params, headers


def _default_to(config: SandboxConfig, provider: str, channel: str) -> str:
    if provider == "twilio":
        number = config.twilio_whatsapp_from if channel == "whatsapp" else config.twilio_from_number
        return number.removeprefix("whatsapp:")
    return config.vonage_from if config.vonage_from.lstrip("+").isdigit() else VONAGE_DEFAULT_NUMBER


async def post_inbound(request: web.Request) -> web.Response:
    """POST /_sandbox/inbound: post one signed inbound webhook and answer with its answer."""
    raw = await request.read()
    try:
        payload = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return web.json_response({"error": f"invalid JSON body: {exc}", "field": None}, status=400)
    if not isinstance(payload, dict):
        return web.json_response({"error": "body must be a JSON object", "field": None}, status=400)
    try:
        url, params, headers = inbound_request(payload, request.app[CONFIG_KEY])
    except InboundInvalid as exc:
        return web.json_response({"error": str(exc), "field": exc.field}, status=400)
    # The provider's own opt-out list, as Twilio's Advanced Opt-Out and Vonage's Opt-out Assist
    # keep one per sender: after a STOP its later sends to the number are refused (21610, status 7).
    _provider_opt_out(request.app[STATE_KEY], payload)
    if payload.get("channel") == "whatsapp":
        # Twilio has the message whatever Conductor's webhook answers: the window is open.
        request.app[STATE_KEY].whatsapp_wrote(payload["from"])
    timeout = aiohttp.ClientTimeout(total=POST_TIMEOUT_S)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, data=form_body(params), headers=headers, allow_redirects=False) as answer,
        ):
            content = await answer.text(errors="replace")
            status, content_type = answer.status, answer.headers.get("Content-Type", "")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response({"error": f"could not post to {url}: {exc!r}", "url": url}, status=502)
    return web.json_response(
        {
            "url": url,
            "status": status,
            "content_type": content_type,
            "body": content,
            "params": {key: value for key, value in params.items() if key != "sig"},
        }
    )


# The providers' default keywords (Twilio's Advanced Opt-Out; Vonage's Opt-out Assist is alike).
PROVIDER_STOP_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
PROVIDER_START_WORDS = frozenset({"START", "UNSTOP", "YES"})


def _provider_opt_out(state: SandboxState, payload: dict[str, Any]) -> None:
    if payload.get("channel", "sms") != "sms":
        return  # the opted-out list refuses SMS only
    word = str(payload.get("body", "")).strip().rstrip(".!?").strip().upper()
    number = str(payload.get("from", "")).removeprefix("whatsapp:")
    provider = payload.get("provider", "twilio")
    if word in PROVIDER_STOP_WORDS:
        state.opt_out(provider, number)
    elif word in PROVIDER_START_WORDS:
        state.opt_in(provider, number)


def register(app: web.Application) -> None:
    app.router.add_post("/_sandbox/inbound", post_inbound)
