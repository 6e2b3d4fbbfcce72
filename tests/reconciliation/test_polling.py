"""Receipt follow-up against the sandbox over real HTTP: overdue receipts are looked up, the
answer applied as a polled receipt; past the horizon a message is marked delivery-unknown."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.models import Message, MessageEvent, Receipt
from messaging.whatsapp_session import whatsapp_session_record
from reconciliation.polling import receipts_poll_overdue

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def twilio_first(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {**settings.CONDUCTOR["ROUTES"], "sms": ["twilio"]}}


def dispatched(make_message, *, ago: timedelta, **fields) -> Message:
    """A message really sent to the sandbox, its dispatch moved `ago` into the past."""
    message = make_message(**fields)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched", message.last_error_message
    Message.objects.filter(pk=message.pk).update(dispatched_at=timezone.now() - ago)
    message.refresh_from_db()
    return message


def test_an_overdue_receipt_is_looked_up_and_applied_as_a_polled_receipt(sandbox, make_message):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)  # delivered, but the callback is lost
    overdue = dispatched(make_message, ago=timedelta(minutes=11))
    recent = dispatched(make_message, ago=timedelta(minutes=2))  # not overdue yet: left alone
    report = receipts_poll_overdue()
    assert (report.polled, report.updated) == (1, 1)
    overdue.refresh_from_db()
    recent.refresh_from_db()
    assert overdue.state == "delivered" and recent.state == "dispatched" and recent.receipt_polled_at is None
    receipt = Receipt.objects.get(message=overdue)
    assert (receipt.source, receipt.provider_status, receipt.applied) == ("poll", "delivered", True)
    event = MessageEvent.objects.filter(message=overdue).latest("id")
    assert (event.source, event.to_state) == ("poll", "delivered")


def test_a_message_the_provider_still_has_as_sent_is_asked_again_only_after_the_repoll_interval(sandbox, make_message):
    sandbox.faults(drop_rate=1.0)  # accepted, then silently dropped: "sent" forever
    message = dispatched(make_message, ago=timedelta(minutes=11))
    assert receipts_poll_overdue().still_pending == 1
    assert receipts_poll_overdue().polled == 0  # asked a moment ago
    Message.objects.filter(pk=message.pk).update(receipt_polled_at=timezone.now() - timedelta(minutes=11))
    assert receipts_poll_overdue().polled == 1
    message.refresh_from_db()
    assert message.state == "dispatched" and message.receipt_unknown_at is None


def test_past_the_receipt_horizon_a_message_is_marked_delivery_unknown_and_no_longer_polled(sandbox, make_message):
    sandbox.faults(drop_rate=1.0)
    lost = dispatched(make_message, ago=timedelta(hours=73))  # Twilio's horizon: 72 h
    report = receipts_poll_overdue()
    assert report.marked_unknown == 1 and report.polled == 0
    lost.refresh_from_db()
    assert lost.state == "dispatched" and lost.receipt_unknown_at is not None
    from django.test import Client

    page = Client().get("/metrics").content.decode()
    assert 'conductor_messages_delivery_unknown{channel="sms",provider="twilio"} 1.0' in page


def test_a_look_up_that_fails_is_counted_and_changes_nothing(sandbox, make_message):
    message = dispatched(make_message, ago=timedelta(minutes=11))
    sandbox.faults(outage=True)
    report = receipts_poll_overdue()
    assert (report.polled, report.failed_lookups, report.updated) == (1, 1, 0)
    message.refresh_from_db()
    assert message.state == "dispatched"


def test_providers_without_receipts_are_not_polled(make_message):
    make_message(state="dispatched", channel="email", to="ada@example.com", provider="smtp",
                 provider_message_id="<x@conductor>", dispatched_at=timezone.now() - timedelta(hours=80))  # fmt: skip
    report = receipts_poll_overdue()
    assert (report.polled, report.marked_unknown) == (0, 0)


def test_the_timeout_is_per_channel(sandbox, make_message, settings):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    settings.CONDUCTOR = {**settings.CONDUCTOR, "RECEIPT_TIMEOUT_SECONDS": {"sms": 60.0, "whatsapp": 3600.0}}
    sms = dispatched(make_message, ago=timedelta(minutes=2))
    sandbox.faults(whatsapp_session_hours=0)  # a free-form WhatsApp message: its window open on both sides
    whatsapp_session_record(address="+14155552671", at=timezone.now())
    whatsapp = dispatched(make_message, ago=timedelta(minutes=2), channel="whatsapp")
    assert receipts_poll_overdue().updated == 1
    assert Message.objects.get(pk=sms.pk).state == "delivered"
    assert Message.objects.get(pk=whatsapp.pk).state == "dispatched"


def test_only_configured_providers_are_polled(settings, make_message):
    from reconciliation.polling import receipt_providers

    settings.CONDUCTOR_PROVIDERS = {k: v for k, v in settings.CONDUCTOR_PROVIDERS.items() if k != "vonage"}
    assert receipt_providers() == ["twilio", "mailgun"]
    make_message(state="dispatched", provider="vonage", provider_message_id="x",
                 dispatched_at=timezone.now() - timedelta(hours=80))  # fmt: skip
    assert receipts_poll_overdue().marked_unknown == 0
