"""WhatsApp's customer-service window: opened by each message a recipient sends us (the inbound
webhook records it), read at dispatch to keep free-form messages from a closed window
(docs/whatsapp.md)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from messaging.conf import messaging_setting
from messaging.models import WhatsAppSession


def whatsapp_session_window() -> timedelta | None:
    """How long a recipient's message keeps the window open; None when it is not enforced."""
    hours = messaging_setting("WHATSAPP_SESSION_WINDOW_HOURS")
    return timedelta(hours=hours) if hours else None


def whatsapp_session_record(*, address: str, at: datetime) -> None:
    """The recipient `address` (E.164) wrote to us at `at`: their window is open from then. One
    statement, safe against a concurrent inbound from the same number; an older message arriving
    late (a provider's retry) never moves the time back."""
    updated = WhatsAppSession.objects.filter(address=address, last_inbound_at__lt=at).update(last_inbound_at=at)
    if not updated:
        WhatsAppSession.objects.bulk_create(
            [WhatsAppSession(address=address, last_inbound_at=at)], ignore_conflicts=True
        )


def whatsapp_sessions_open(*, addresses: Iterable[str], now: datetime) -> set[str]:
    """Which of these numbers have an open window at `now` (one query for a whole claim); every
    one of them when the window is not enforced."""
    wanted = set(addresses)
    window = whatsapp_session_window()
    if window is None or not wanted:
        return wanted
    return set(
        WhatsAppSession.objects.filter(address__in=wanted, last_inbound_at__gt=now - window).values_list(
            "address", flat=True
        )
    )
