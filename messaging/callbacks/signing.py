"""Standard Webhooks signatures for status callbacks: the headers of one request, and new secrets.

Signed with the `standardwebhooks` library (the scheme's reference implementation, the one our
receivers are told to verify with): every secret of the endpoint not yet expired signs, so a
receiver still holding the previous secret verifies during a rotation's overlap.
"""

from __future__ import annotations

import base64
import secrets as random_source
from datetime import datetime
from functools import lru_cache
from typing import Any

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"
# 32 random bytes: HMAC-SHA256's block-sized key is 64 bytes, its output 32; more adds nothing.
SECRET_BYTES = 32
USER_AGENT = "Conductor-Callbacks/1"


def new_secret() -> str:
    """A fresh signing secret in the scheme's format: "whsec_" + base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(random_source.token_bytes(SECRET_BYTES)).decode()


@lru_cache(maxsize=4096)
def _signer(secret: str) -> Webhook:
    # Decoding the secret is most of what building a Webhook costs; an endpoint's few are reused.
    return Webhook(secret)


def signing_secrets(secrets: list[dict[str, Any]], now: datetime) -> list[str]:
    """The secrets that sign at `now`: every one without an expiry or expiring later, newest first.

    Raises ValueError when the endpoint has none at all (a callback is never sent unsigned). If
    every secret has expired (only an operator editing them can do that) the newest still signs.
    """
    if not secrets:
        raise ValueError("the endpoint has no signing secret")
    valid = [entry["secret"] for entry in secrets if not _expired(entry.get("expires_at"), now)]
    return valid or [secrets[0]["secret"]]


def _expired(expires_at: str | datetime | None, now: datetime) -> bool:
    if expires_at is None or expires_at == "":
        return False
    if isinstance(expires_at, str):
        expires_at = datetime.fromisoformat(expires_at)
    return expires_at <= now


def callback_headers(*, webhook_id: str, body: bytes, secrets: list[dict[str, Any]], now: datetime) -> dict[str, str]:
    """The request headers of one callback attempt: `body` is signed exactly as it is sent, at
    `now` (webhook-timestamp is the send time; the receiver checks it is recent)."""
    signatures = " ".join(
        _signer(secret).sign(msg_id=webhook_id, timestamp=now, data=body) for secret in signing_secrets(secrets, now)
    )
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
