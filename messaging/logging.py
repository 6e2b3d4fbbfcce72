"""Log helpers: recipients are masked so logs never hold a full phone number or address."""

from __future__ import annotations


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
