"""Receipts: stored once, applied forward-only, kept when unmatched or out of order."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import AttemptOutcome, DispatchAttempt, Message, Receipt
from messaging.outcomes import message_record_dispatched
from messaging.receipts import receipt_record
from providers.types import ReceiptEvent, SendResult

pytestmark = pytest.mark.django_db


@pytest.fixture
def message(make_message):
    return make_message()


def event(message_id, status, state, sid="SM1"):
    return ReceiptEvent(
        provider="twilio",
        event_id=f"{sid}:{status}",
        provider_message_id=sid,
        provider_status=status,
        state=state,
        message_id=str(message_id) if message_id else None,
        payload={"MessageStatus": status},
    )


def test_a_receipt_moves_the_message_and_is_stored_with_its_payload(message):
    Message.objects.filter(pk=message.pk).update(state="dispatched", provider="twilio", provider_message_id="SM1")
    receipt, new = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert new and receipt.applied and receipt.payload == {"MessageStatus": "delivered"}
    message.refresh_from_db()
    assert message.state == "delivered" and message.delivered_at


def test_a_repeated_receipt_is_stored_once(message):
    receipt_record(event=event(message.pk, "delivered", "delivered"))
    _, new = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert not new and Receipt.objects.count() == 1


def test_a_late_receipt_never_moves_the_state_back(message):
    Message.objects.filter(pk=message.pk).update(state="read")
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert not receipt.applied and Message.objects.get(pk=message.pk).state == "read"
    assert message.events.filter(applied=False, to_state="delivered").exists()


def test_an_unknown_reference_is_kept_unmatched_and_counted(client):
    receipt, new = receipt_record(event=event(None, "delivered", "delivered", sid="SM-unknown"))
    assert new and receipt.message is None and not receipt.applied
    assert 'conductor_receipts_unmatched{provider="twilio"} 1.0' in client.get("/metrics").content.decode()


def test_a_receipt_found_by_provider_reference_alone(message):
    Message.objects.filter(pk=message.pk).update(state="dispatched", provider="twilio", provider_message_id="SM9")
    receipt, _ = receipt_record(event=event(None, "undelivered", "undelivered", sid="SM9"))
    assert receipt.message_id == message.pk and Message.objects.get(pk=message.pk).state == "undelivered"


def test_delivered_before_our_dispatched_write_is_applied_and_the_worker_keeps_the_reference(message):
    # The worker has claimed the message and is waiting for the provider's answer...
    lease = timezone.now() + timedelta(seconds=30)
    Message.objects.filter(pk=message.pk).update(lease_expires_at=lease)
    attempt = DispatchAttempt.objects.create(message=message, number=1, provider="twilio", started_at=timezone.now())
    # ...when the receipt overtakes it: applied although the message is still accepted.
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered", sid="SM-early"))
    assert receipt.applied
    message.refresh_from_db()
    assert message.state == "delivered" and message.provider_message_id == "SM-early"
    # The worker's own "dispatched" write is refused, never applied backwards; it keeps the reference.
    message_record_dispatched(
        message=message,
        attempt=attempt,
        result=SendResult("SM-early", "queued"),
        started=time.monotonic(),
        outcome=AttemptOutcome.ACCEPTED,
    )
    message.refresh_from_db()
    assert message.state == "delivered" and message.dispatched_at and message.lease_expires_at is None
    assert message.events.filter(to_state="dispatched", applied=False).exists()


def test_read_before_delivered_ends_read_with_both_receipts_kept(message):
    Message.objects.filter(pk=message.pk).update(state="dispatched", provider="twilio", provider_message_id="SM1")
    read, _ = receipt_record(event=event(message.pk, "read", "read"))
    delivered, _ = receipt_record(event=event(message.pk, "delivered", "delivered"))
    message.refresh_from_db()
    assert message.state == "read" and read.applied and not delivered.applied
    assert message.receipts.count() == 2
    assert list(message.events.values_list("to_state", "applied")) == [("read", True), ("delivered", False)]


def test_the_same_receipt_ten_times_changes_the_state_once(message):
    Message.objects.filter(pk=message.pk).update(state="dispatched", provider="twilio", provider_message_id="SM1")
    results = [receipt_record(event=event(message.pk, "delivered", "delivered")) for _ in range(10)]
    assert [new for _, new in results] == [True] + [False] * 9
    assert Receipt.objects.count() == 1
    assert message.events.filter(to_state="delivered").count() == 1
