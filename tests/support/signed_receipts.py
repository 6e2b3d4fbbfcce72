"""Receipt webhooks as each provider signs them, with any field made odd: for the forgery and
malformed-receipt tests, in process (Django's test client) and over real HTTP (the live stack)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator
from vonage_http_client import Auth

from providers.conf import provider_config
from providers.sandbox.vonage_api import signature as vonage_signature

MAILGUN_TRACKING_PATH = "/webhooks/anymail/mailgun/tracking/"
MAILGUN_PROVIDER_PATH = "/webhooks/mailgun/"
VONAGE_PATH = "/webhooks/vonage/"
TWILIO_PATH = "/webhooks/twilio/"


# --- Twilio: form fields, signed over our public URL (with the query) and the fields -------------
def twilio_callback(
    public_url: str,
    *,
    message_id: str | None = None,
    sid: str = "SM0123456789abcdef0123456789abcdef",
    status: str = "delivered",
    auth_token: str | None = None,
    **fields: str,
) -> tuple[str, dict[str, str], dict[str, str]]:
    """(path with query, form fields, headers) of a Twilio status callback."""
    message_id = message_id or str(uuid.uuid4())
    path = f"{TWILIO_PATH}?" + urlencode({"message_id": message_id, "token": f"{message_id}.1"})
    params = {"MessageSid": sid, "MessageStatus": status, "To": "+14155552671", "AccountSid": "AC0", **fields}
    token = auth_token or provider_config("twilio")["AUTH_TOKEN"]
    signature = RequestValidator(token).compute_signature(public_url.rstrip("/") + path, params)
    return path, params, {"X-Twilio-Signature": signature}


# --- Vonage: a delivery receipt, signed with the signature secret (the sandbox's signer) ---------
def vonage_dlr(*, message_id: str | None = None, provider_message_id: str | None = None, **overrides: Any):
    """The parameters of a Vonage delivery receipt, unsigned (overrides may be any JSON value)."""
    params: dict[str, Any] = {
        "msisdn": "14155552671",
        "to": "Conductor",
        "network-code": "310260",
        "messageId": provider_message_id or str(uuid.uuid4()),
        "price": "0.00570000",
        "status": "delivered",
        "scts": "2501011200",
        "err-code": "0",
        "api-key": provider_config("vonage")["API_KEY"],
        "client-ref": f"{message_id or uuid.uuid4()}.1",
        "message-timestamp": "2025-01-01 12:00:00",
        "timestamp": str(int(time.time())),
        "nonce": str(uuid.uuid4()),
    }
    params.update(overrides)
    return params


def vonage_signed(params: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    """Signed as the adapter verifies: with the SDK (its text of a non-string JSON value is the
    value's str(), so odd types reach parse()), or Vonage's MD5 hash scheme as the sandbox signs."""
    config = provider_config("vonage")
    key, method = secret or config["SIGNATURE_SECRET"], config["SIGNATURE_METHOD"]
    if method == "md5hash":
        return {**params, "sig": vonage_signature(params, key, method)}
    signer = Auth(api_key=config["API_KEY"], signature_secret=key, signature_method=method)
    return {**params, "sig": signer.sign_params(dict(params))}


# --- Mailgun: signed over timestamp + token only; the event itself is not signed ----------------
def mailgun_signature(*, timestamp: str | None = None, token: str | None = None, key: str | None = None):
    timestamp = timestamp if timestamp is not None else str(int(time.time()))
    token = token or uuid.uuid4().hex + uuid.uuid4().hex[:18]  # 50 characters, as Mailgun's
    key = key or provider_config("mailgun")["WEBHOOK_SIGNING_KEY"]
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    return {"timestamp": timestamp, "token": token, "signature": signature}


def mailgun_event(*, message_id: str | None = None, event: str = "delivered", **data: Any) -> dict[str, Any]:
    """Mailgun's event-data of one event (overrides may be any JSON value)."""
    event_data: dict[str, Any] = {
        "id": uuid.uuid4().hex[:22],
        "event": event,
        "timestamp": time.time(),
        "recipient": "ada@example.com",
        "message": {"headers": {"message-id": f"{uuid.uuid4().hex}@mg.example.com"}},
        "user-variables": {"conductor_message_id": message_id or str(uuid.uuid4())},
    }
    event_data.update(data)
    return event_data


def mailgun_body(event_data: Any = None, **signature: Any) -> dict[str, Any]:
    """A tracking webhook in Mailgun's current (JSON) format, freshly signed unless told otherwise."""
    return {
        "signature": mailgun_signature(**signature),
        "event-data": mailgun_event() if event_data is None else event_data,
    }


def mailgun_legacy_form(*, message_id: str | None = None, **fields: str) -> dict[str, str]:
    """A tracking webhook in Mailgun's legacy format: form fields with the signature among them."""
    form = {
        "event": "delivered",
        "recipient": "ada@example.com",
        "Message-Id": f"<{uuid.uuid4().hex}@mg.example.com>",
        "conductor_message_id": message_id or str(uuid.uuid4()),
        **mailgun_signature(),
    }
    form.update(fields)
    return form


def as_json(body: Any) -> bytes:
    return json.dumps(body).encode()
