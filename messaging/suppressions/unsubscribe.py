"""One-click unsubscribe for email (RFC 8058): the List-Unsubscribe headers a bulk or list email
carries, the signed token in its link, and what a POST to that link does.

The token is the only authority: it is signed (django.core.signing, salted, with SECRET_KEY, so
SECRET_KEY_FALLBACKS keeps old links working across a key rotation) and names the client, the
channel, the address and the scope. It has no expiry: a mailbox provider may POST the link months
after the email arrived, and an unsubscribe that stops working is what RFC 8058 and the mailbox
providers' bulk-sender rules forbid. It is signed, not encrypted: the address is readable in it,
which is fine for a link only ever sent to that address.
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import signing

from messaging.conf import messaging_setting
from messaging.logging import masked
from messaging.models import ApiClient, Suppression, SuppressionReason
from messaging.routing import Channel, Priority
from messaging.suppressions.services import suppression_add
from providers.conf import providers_setting

logger = logging.getLogger(__name__)

TOKEN_SALT = "conductor.unsubscribe"
UNSUBSCRIBE_PATH = "/unsubscribe/{token}/"
ONE_CLICK = "List-Unsubscribe=One-Click"  # RFC 8058's List-Unsubscribe-Post value and POST body
ONE_CLICK_SOURCE = "one-click"


class InvalidUnsubscribeToken(ValueError):
    """A forged, altered, truncated or otherwise unreadable unsubscribe token."""


@dataclass(frozen=True)
class UnsubscribeTarget:
    """What one unsubscribe link names."""

    client_id: int
    channel: str
    address: str
    scope: str  # "" every category but the client's opt-out-exempt ones, else one category


def list_unsubscribe_scope(*, category: str, priority: str) -> str | None:
    """The scope an unsubscribe from this email covers, or None when it carries no List-Unsubscribe:
    a category of LIST_UNSUBSCRIBE_CATEGORIES is its own scope; another bulk email's is ""."""
    if category and category in messaging_setting("LIST_UNSUBSCRIBE_CATEGORIES"):
        return category
    if priority == Priority.BULK:
        return ""
    return None


@functools.lru_cache(maxsize=4)
def _signer(secret_key: str) -> signing.Signer:
    # One per key: every bulk email signs a token, and building a signer is half of the cost.
    return signing.Signer(key=secret_key, salt=TOKEN_SALT)


def unsubscribe_token(target: UnsubscribeTarget) -> str:
    """The signed token of a link (URL-safe: base64 and a colon). No timestamp: it never expires."""
    payload = [target.client_id, target.channel, target.address, target.scope]
    return _signer(settings.SECRET_KEY).sign_object(payload)


def unsubscribe_target(token: str) -> UnsubscribeTarget:
    """The target a token names; InvalidUnsubscribeToken unless it is one we signed (with
    SECRET_KEY or one of SECRET_KEY_FALLBACKS)."""
    try:
        payload: Any = signing.Signer(salt=TOKEN_SALT).unsign_object(token)
    except (signing.BadSignature, ValueError, UnicodeError, zlib.error) as exc:  # bad base64 or JSON too
        raise InvalidUnsubscribeToken("the unsubscribe link is not valid") from exc
    if not (
        isinstance(payload, list)
        and len(payload) == 4
        and isinstance(payload[0], int)
        and all(isinstance(part, str) for part in payload[1:])
        and payload[1] == Channel.EMAIL
        and payload[2]
    ):
        raise InvalidUnsubscribeToken("the unsubscribe link does not name an address")
    return UnsubscribeTarget(client_id=payload[0], channel=payload[1], address=payload[2], scope=payload[3])


def unsubscribe_url(target: UnsubscribeTarget) -> str:
    return providers_setting("PUBLIC_URL").rstrip("/") + UNSUBSCRIBE_PATH.format(token=unsubscribe_token(target))


def list_unsubscribe_headers(*, client_id: int, address: str, category: str, priority: str) -> dict[str, str]:
    """The RFC 8058 headers of one email ({} when it carries none): a bulk email, or one of a
    LIST_UNSUBSCRIBE_CATEGORIES category."""
    scope = list_unsubscribe_scope(category=category, priority=priority)
    if scope is None:
        return {}
    target = UnsubscribeTarget(client_id=client_id, channel=Channel.EMAIL, address=address.strip().lower(), scope=scope)
    return {"List-Unsubscribe": f"<{unsubscribe_url(target)}>", "List-Unsubscribe-Post": ONE_CLICK}


def unsubscribe_one_click(*, token: str, source: str = ONE_CLICK_SOURCE) -> tuple[Suppression, bool]:
    """Suppress what the token names (reason unsubscribed); idempotent: a second POST of the same
    link returns the suppression the first made. InvalidUnsubscribeToken when the token is not
    ours or names a client that no longer exists (nothing is stored then)."""
    target = unsubscribe_target(token)
    client = ApiClient.objects.filter(pk=target.client_id).first()
    if client is None:
        raise InvalidUnsubscribeToken("the unsubscribe link names no known sender")
    suppression, created = suppression_add(
        client=client,
        channel=target.channel,
        address=target.address,
        reason=SuppressionReason.UNSUBSCRIBED,
        scope=target.scope,
        source=source,
    )
    if not created:
        logger.info("one-click unsubscribe repeated for %s: %s", client.name, masked(target.address))
    return suppression, created
