"""Inbound message webhooks (a recipient's STOP, START, HELP) as Twilio and Vonage sign them, for
the in-process webhook tests (Django's test client)."""

from __future__ import annotations

import time
import uuid
from typing import Any

from twilio.request_validator import RequestValidator

from providers.conf import provider_config, providers_setting
from tests.support.signed_receipts import vonage_signed

TWILIO_INBOUND_PATH = "/webhooks/twilio/inbound/"
VONAGE_INBOUND_PATH = "/webhooks/vonage/inbound/"


def twilio_inbound(
    body: str,
    *,
    sender: str = "+14155552671",
    to: str = "+15005550006",
    sid: str | None = None,
    whatsapp: bool = False,
    auth_token: str | None = None,
    url: str | None = None,
    **fields: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """(form fields, headers) of Twilio's incoming message request, signed over our public URL."""
    sid = sid or "SM" + uuid.uuid4().hex
    prefix = "whatsapp:" if whatsapp else ""
    params = {
        "MessageSid": sid,
        "SmsSid": sid,
        "SmsMessageSid": sid,
        "AccountSid": provider_config("twilio")["ACCOUNT_SID"],
        "From": prefix + sender,
        "To": prefix + to,
        "Body": body,
        "NumMedia": "0",
        "NumSegments": "1",
        "SmsStatus": "received",
        "ApiVersion": "2010-04-01",
        **fields,
    }
    url = url or providers_setting("PUBLIC_URL").rstrip("/") + TWILIO_INBOUND_PATH
    token = auth_token or provider_config("twilio")["AUTH_TOKEN"]
    return params, {"HTTP_X_TWILIO_SIGNATURE": RequestValidator(token).compute_signature(url, params)}


def vonage_inbound(
    text: str,
    /,
    *,
    msisdn: str = "14155552671",
    to: str = "12015550123",
    message_id: str | None = None,
    secret: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Vonage's inbound SMS parameters, signed with the signature secret (overrides may be any JSON value)."""
    now = time.time()
    params: dict[str, Any] = {
        "msisdn": msisdn,
        "to": to,
        "messageId": message_id or uuid.uuid4().hex[:16].upper(),
        "text": text,
        "type": "text",
        "keyword": text.split()[0].upper() if text.split() else "",
        "api-key": provider_config("vonage")["API_KEY"],
        "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now)),
        "timestamp": str(int(now)),
        "nonce": str(uuid.uuid4()),
    }
    params.update(overrides)
    return vonage_signed(params, secret)
