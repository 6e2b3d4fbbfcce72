"""Receipts: stored once, applied in batches forward-only, only to sends of ours, kept when unmatched."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging import receipts as receipts_module
from messaging.models import AttemptOutcome, DispatchAttempt, Message, Receipt
from messaging.outcomes import message_record_dispatched
from messaging.receipts import (
    receipt_record,
    receipts_apply_batch,
    receipts_due_waiting,
    receipts_rematch,
    receipts_store,
)
from providers.types import ReceiptEvent, SendResult

pytestmark = pytest.mark.django_db


@pytest.fixture
def message(make_message):
    return make_message()


def sent(message, provider="twilio", sid="SM1", state="dispatched"):
    """The message as a worker leaves it once `provider` took it under `sid`."""
    DispatchAttempt.objects.create(
        message=message,
        number=1,
        provider=provider,
        provider_message_id=sid,
        outcome=AttemptOutcome.ACCEPTED,
        started_at=timezone.now(),
    )
    Message.objects.filter(pk=message.pk).update(state=state, provider=provider, provider_message_id=sid)
    return message


def event(message_id, status, state, sid="SM1", provider="twilio"):
    return ReceiptEvent(
        provider=provider,
        event_id=f"{sid}:{status}",
        provider_message_id=sid,
        provider_status=status,
        state=state,
        message_id=str(message_id) if message_id else None,
        payload={"MessageStatus": status},
    )


def test_a_receipt_moves_the_message_and_is_stored_with_its_payload(message):
    sent(message)
    receipt, new = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert new and receipt.applied and receipt.payload == {"MessageStatus": "delivered"}
    assert receipt.processed_at and receipt.message_id == message.pk and not receipt.unmatched_reason
    message.refresh_from_db()
    assert message.state == "delivered" and message.delivered_at


def test_a_repeated_receipt_is_stored_once(message):
    sent(message)
    receipt_record(event=event(message.pk, "delivered", "delivered"))
    _, new = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert not new and Receipt.objects.count() == 1


def test_a_late_receipt_never_moves_the_state_back(message):
    sent(message, state="read")
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert not receipt.applied and Message.objects.get(pk=message.pk).state == "read"
    assert message.events.filter(applied=False, to_state="delivered").exists()


def test_an_unknown_reference_is_kept_unmatched_and_counted(client):
    receipt, new = receipt_record(event=event(None, "delivered", "delivered", sid="SM-unknown"))
    assert new and receipt.message is None and not receipt.applied and receipt.unmatched_reason == "no_message"
    metrics = client.get("/metrics").content.decode()
    assert 'conductor_receipts_unmatched{provider="twilio",reason="no_message"} 1.0' in metrics


def test_a_receipt_found_by_provider_reference_alone(message):
    sent(message, sid="SM9")
    receipt, _ = receipt_record(event=event(None, "undelivered", "undelivered", sid="SM9"))
    assert receipt.message_id == message.pk and Message.objects.get(pk=message.pk).state == "undelivered"


def test_a_receipt_from_a_provider_the_message_never_went_to_changes_nothing(message):
    sent(message, provider="vonage", sid="V1")
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered", sid="SM1"))
    assert receipt.unmatched_reason == "no_attempt" and not receipt.applied and receipt.message_id is None
    assert Message.objects.get(pk=message.pk).state == "dispatched"


def test_an_accepted_message_never_sent_is_never_made_delivered(message):
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert receipt.unmatched_reason == "no_attempt"
    assert Message.objects.get(pk=message.pk).state == "accepted"
    assert not message.events.exists()


def test_a_receipt_under_another_provider_id_changes_nothing(message):
    sent(message, sid="SM-real")
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered", sid="SM-forged"))
    assert receipt.unmatched_reason == "id_mismatch" and Message.objects.get(pk=message.pk).state == "dispatched"


def test_delivered_before_our_dispatched_write_waits_for_it(message):
    # The worker has claimed the message and is waiting for the provider's answer...
    lease = timezone.now() + timedelta(seconds=30)
    Message.objects.filter(pk=message.pk).update(lease_expires_at=lease)
    attempt = DispatchAttempt.objects.create(message=message, number=1, provider="twilio", started_at=timezone.now())
    # ...when the receipt overtakes it: it waits, the message is not made delivered from accepted.
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered", sid="SM-early"))
    assert receipt.processed_at is None and receipt.deferrals == 1 and receipt.due_at > timezone.now()
    assert Message.objects.get(pk=message.pk).state == "accepted"
    message.refresh_from_db()
    message_record_dispatched(
        message=message,
        attempt=attempt,
        result=SendResult("SM-early", "queued"),
        started=time.monotonic(),
        outcome=AttemptOutcome.ACCEPTED,
    )
    # Once it is due again, it applies on top of our own write.
    report = receipts_apply_batch(now=receipt.due_at)
    assert report.applied == 1
    message.refresh_from_db()
    assert message.state == "delivered" and message.dispatched_at and message.provider_message_id == "SM-early"
    assert list(message.events.values_list("to_state", "applied")) == [("dispatched", True), ("delivered", True)]


def test_a_receipt_held_longer_than_the_hold_is_kept_as_never_dispatched(message, settings):
    settings.CONDUCTOR = {"RECEIPT_HOLD_SECONDS": 1.0}
    DispatchAttempt.objects.create(message=message, number=1, provider="twilio", started_at=timezone.now())
    receipt, _ = receipt_record(event=event(message.pk, "delivered", "delivered"))
    assert receipt.processed_at is None
    receipts_apply_batch(now=timezone.now() + timedelta(seconds=5))
    receipt.refresh_from_db()
    assert receipt.unmatched_reason == "never_dispatched" and receipt.processed_at
    assert Message.objects.get(pk=message.pk).state == "accepted"


def test_read_before_delivered_ends_read_with_both_receipts_kept(message):
    sent(message)
    read, _ = receipt_record(event=event(message.pk, "read", "read"))
    delivered, _ = receipt_record(event=event(message.pk, "delivered", "delivered"))
    message.refresh_from_db()
    assert message.state == "read" and read.applied and not delivered.applied
    assert message.receipts.count() == 2
    assert list(message.events.values_list("to_state", "applied")) == [("read", True), ("delivered", False)]


def test_receipts_out_of_order_in_one_batch_are_applied_in_lifecycle_order(message, django_capture_on_commit_callbacks):
    sent(message)
    with django_capture_on_commit_callbacks():
        receipts_store(
            events=[
                event(message.pk, "read", "read"),
                event(message.pk, "delivered", "delivered"),
                event(message.pk, "sent", "dispatched"),
            ]
        )
    assert Receipt.objects.filter(processed_at__isnull=True).count() == 3
    report = receipts_apply_batch()
    assert (report.taken, report.applied, report.kept) == (3, 2, 1)
    message.refresh_from_db()
    assert message.state == "read" and message.delivered_at and message.read_at
    assert list(message.events.values_list("to_state", flat=True)) == ["delivered", "read"]
    assert not Receipt.objects.filter(processed_at__isnull=True).exists()


def test_the_same_receipt_ten_times_changes_the_state_once(message):
    sent(message)
    results = [receipt_record(event=event(message.pk, "delivered", "delivered")) for _ in range(10)]
    assert [new for _, new in results] == [True] + [False] * 9
    assert Receipt.objects.count() == 1
    assert message.events.filter(to_state="delivered").count() == 1


def test_a_batch_of_many_messages_costs_a_few_statements(make_message):
    messages = [sent(make_message(), sid=f"SM{i}") for i in range(200)]
    receipts_store(events=[event(m.pk, "sent", "dispatched", sid=f"SM{i}") for i, m in enumerate(messages)])
    receipts_store(events=[event(m.pk, "delivered", "delivered", sid=f"SM{i}") for i, m in enumerate(messages)])
    with CaptureQueriesContext(connection) as queries:
        report = receipts_apply_batch()
    assert (report.taken, report.applied) == (400, 200)
    assert len(queries) <= 15, [q["sql"][:120] for q in queries]
    assert Message.objects.filter(state="delivered").count() == 200


def test_a_batch_that_fails_half_way_leaves_every_receipt_pending(message, monkeypatch):
    sent(message)
    receipts_store(events=[event(message.pk, "delivered", "delivered")])

    def crash(**kwargs):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(receipts_module, "messages_transition", crash)
    with pytest.raises(RuntimeError):
        receipts_apply_batch()
    assert Receipt.objects.get().processed_at is None
    assert Message.objects.get(pk=message.pk).state == "dispatched"
    # The sweeper sees it waiting once it has been due a while, and the next batch applies it.
    assert receipts_due_waiting(now=timezone.now() + timedelta(seconds=10), older_than=timedelta(seconds=5))
    monkeypatch.undo()
    assert receipts_apply_batch().applied == 1


def test_reconciliation_rematches_a_receipt_whose_send_is_known_now(message):
    receipt, _ = receipt_record(event=event(None, "delivered", "delivered", sid="SM-late"))
    assert receipt.unmatched_reason == "no_message"
    sent(message, sid="SM-late")
    assert receipts_rematch(receipt_ids=[receipt.pk]) == 1
    assert Message.objects.get(pk=message.pk).state == "delivered"


@pytest.mark.django_db(transaction=True)
def test_concurrent_webhooks_share_writes_and_each_returns_once_its_receipt_is_stored(make_message):
    # As gunicorn's threads do: each stores its receipt outside a transaction and must find it
    # committed when receipts_store returns; the writes are shared while one is under way.
    inserts: list[int] = []
    original = receipts_module._insert

    def counting_insert(rows):
        inserts.append(len(rows))
        time.sleep(0.02)  # a slow disk: the other threads' receipts gather meanwhile
        original(rows)

    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def webhook(n: int) -> None:
        try:
            barrier.wait()
            receipts_store(events=[event(None, "delivered", "delivered", sid=f"SM-{n}")])
            assert Receipt.objects.filter(event_id=f"SM-{n}:delivered").exists()
        except BaseException as exc:  # reported below, from the test's own thread
            errors.append(exc)
        finally:
            connections.close_all()

    receipts_module._insert = counting_insert
    try:
        threads = [threading.Thread(target=webhook, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    finally:
        receipts_module._insert = original
    assert not errors, errors
    assert Receipt.objects.count() == 16 and sum(inserts) == 16
    assert len(inserts) < 16, f"every receipt written alone: {inserts}"


@pytest.mark.django_db(transaction=True)
def test_a_failed_shared_write_fails_every_webhook_in_it(monkeypatch):
    def broken(rows):
        raise RuntimeError("database gone")

    monkeypatch.setattr(receipts_module, "_insert", broken)
    with pytest.raises(RuntimeError, match="database gone"):
        receipts_store(events=[event(None, "delivered", "delivered")])
    monkeypatch.undo()
    receipts_store(events=[event(None, "delivered", "delivered")])  # the next write is not stuck
    assert Receipt.objects.count() == 1


def test_the_sweeper_publishes_the_applier_for_a_receipt_whose_trigger_was_lost(message, monkeypatch):
    from messaging.sweeper import messages_sweep

    published: list[bool] = []
    monkeypatch.setattr(receipts_module, "_publish", lambda: published.append(True) or True)
    sent(message)
    receipts_store(events=[event(message.pk, "delivered", "delivered")])  # in a transaction: no trigger ran
    assert not messages_sweep(now=timezone.now()).receipts_triggered  # not waiting long enough yet
    assert messages_sweep(now=timezone.now() + timedelta(seconds=10)).receipts_triggered and published == [True]


def test_a_receipt_batch_leaves_a_message_still_being_sent_unlocked(message):
    # Its receipt only waits; a worker recording it dispatched must not wait for the batch.
    DispatchAttempt.objects.create(message=message, number=1, provider="twilio", started_at=timezone.now())
    receipts_store(events=[event(message.pk, "sent", "dispatched")])
    with CaptureQueriesContext(connection) as queries:
        assert receipts_apply_batch().deferred == 1
    locking = [q["sql"] for q in queries if "FOR UPDATE" in q["sql"] and "messaging_message" in q["sql"]]
    assert not locking, locking
