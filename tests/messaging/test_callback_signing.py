"""Callback signatures, checked with the Standard Webhooks reference library as a receiver would."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from messaging.callbacks.signing import USER_AGENT, callback_headers, new_secret, signing_secrets

NOW = datetime.now(UTC)
BODY = b'{"type":"message.delivered","data":{"sequence":2}}'


def _secret(secret: str, expires_at: datetime | None = None) -> dict:
    return {
        "secret": secret,
        "created_at": NOW.isoformat(),
        "expires_at": expires_at.isoformat() if expires_at else None,
    }


def test_new_secrets_are_random_whsec_base64_of_32_bytes():
    first, second = new_secret(), new_secret()
    assert first != second
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    Webhook(first)  # the library takes it as it is


def test_headers_verify_with_the_reference_library():
    secret = new_secret()
    now = datetime.now(UTC)  # the reference library refuses a timestamp over 5 minutes old
    headers = callback_headers(webhook_id="msg_abc", body=BODY, secrets=[_secret(secret)], now=now)
    assert headers["webhook-id"] == "msg_abc"
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == USER_AGENT
    assert Webhook(secret).verify(BODY, headers) == {"type": "message.delivered", "data": {"sequence": 2}}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", headers)  # signed exactly as sent
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_during_a_rotation_both_secrets_sign_and_an_expired_one_does_not():
    new, old, gone = new_secret(), new_secret(), new_secret()
    now = datetime.now(UTC)  # the reference library refuses a timestamp over 5 minutes old
    secrets = [_secret(new), _secret(old, now + timedelta(hours=1)), _secret(gone, now - timedelta(seconds=1))]
    headers = callback_headers(webhook_id="msg_rot", body=BODY, secrets=secrets, now=now)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(new).verify(BODY, headers)
    Webhook(old).verify(BODY, headers)  # a receiver that has not switched yet
    with pytest.raises(WebhookVerificationError):
        Webhook(gone).verify(BODY, headers)


def test_no_secret_is_an_error_and_all_expired_still_signs_with_the_newest():
    with pytest.raises(ValueError, match="no signing secret"):
        signing_secrets([], NOW)
    expired = [_secret("whsec_bmV3ZXN0", NOW - timedelta(days=1)), _secret("whsec_b2xk", NOW - timedelta(days=2))]
    assert signing_secrets(expired, NOW) == ["whsec_bmV3ZXN0"]
