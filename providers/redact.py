"""What logs may show of a recipient or a URL: a phone number or address masked
('+1415*****71', 'a***@example.com'), free text with those masked, a URL without its path and
query (where webhook URLs keep their secret). messaging.logging re-exports these."""

from __future__ import annotations

import re
from urllib.parse import urlsplit


def masked(recipient: str) -> str:
    """'+14155550123' -> '+1415*****23'; 'alice@example.com' -> 'a***@example.com'."""
    if not recipient:
        return ""
    if "@" in recipient:
        local, _, domain = recipient.partition("@")
        return f"{local[:1]}***@{domain}"
    keep_head, keep_tail = 5, 2
    if len(recipient) <= keep_head + keep_tail:
        return recipient[:2] + "*" * max(0, len(recipient) - 2)
    return recipient[:keep_head] + "*" * (len(recipient) - keep_head - keep_tail) + recipient[-keep_tail:]


# A phone number (E.164, or a bare run of 10-15 digits a provider echoes back) or an email
# address inside free text; dates, codes and counts stay readable.
_PHONE = re.compile(r"\+\d{7,15}\b|\b\d{10,15}\b")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def scrubbed(text: str) -> str:
    """Free text (a provider's error message, a transition detail) with recipients masked."""
    text = _EMAIL.sub(lambda m: masked(m.group()), text)
    return _PHONE.sub(lambda m: masked(m.group()), text)


def redacted_url(url: str) -> str:
    """A URL with only its scheme and host (and port): 'https://hooks.slack.com/…'. Webhook URLs
    (Slack's, most chat tools') carry their secret in the path or the query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{rest}" if parts.scheme else "…"
