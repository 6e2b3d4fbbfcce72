"""Reconciliation runs against the sandbox: missing receipts applied, conflicts counted, one run
at a time (advisory lock), safe to repeat, a stored report, and the command."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings as django_settings
from django.core.management import CommandError, call_command
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.locks import cluster_lock_id
from messaging.models import Message, Receipt
from messaging.receipts import receipt_record
from providers.types import ReceiptEvent
from reconciliation.models import ReconciliationRun
from reconciliation.reconcile import LOCK_NAME, reconciliation_run

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def twilio_first(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {**settings.CONDUCTOR["ROUTES"], "sms": ["twilio"]}}


def send(make_message, **fields) -> Message:
    message = make_message(**fields)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    return message


def delivered_with_receipt(make_message) -> Message:
    message = send(make_message)
    receipt_record(
        event=ReceiptEvent(
            provider="twilio", event_id=f"cb-{message.pk}", provider_message_id=message.provider_message_id,
            provider_status="delivered", state="delivered", message_id=str(message.pk),
        )
    )  # fmt: skip
    return message


def today():
    return timezone.now().date()


def test_a_run_applies_what_the_provider_knows_and_counts_the_rest(sandbox, make_message):
    consistent = [delivered_with_receipt(make_message) for _ in range(3)]
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    lost_receipts = [send(make_message) for _ in range(2)]
    sandbox.faults(receipt_loss_rate=0.0, drop_rate=1.0)
    dropped = send(make_message)
    sandbox.faults(drop_rate=0.0, receipt_loss_rate=1.0, receipt_status="undelivered")
    conflict = send(make_message)
    Message.objects.filter(pk=conflict.pk).update(state="delivered")  # we believe delivered, no receipt behind it
    requests_before = len(sandbox.requests())

    run = reconciliation_run(day=today(), trigger="test")

    assert run.status == "completed" and run.duration_ms is not None and run.finished_at
    assert (run.checked, run.looked_up, run.updated, run.still_unknown) == (7, 4, 2, 1)
    assert run.mismatches == {"missing_receipt": 2, "state_conflict": 1}
    assert {m.pk for m in lost_receipts} == set(
        Message.objects.filter(state="delivered", receipts__source="poll").values_list("pk", flat=True)
    )
    assert Message.objects.get(pk=dropped.pk).state == "dispatched"
    assert Message.objects.get(pk=conflict.pk).state == "delivered"  # never moved backwards
    assert all(Message.objects.get(pk=m.pk).state == "delivered" for m in consistent)
    assert len(sandbox.requests()) == requests_before  # look-ups only: nothing was sent


def test_running_the_same_day_again_changes_nothing(sandbox, make_message):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    send(make_message)
    assert reconciliation_run(day=today(), trigger="test").updated == 1
    again = reconciliation_run(day=today(), trigger="test")
    assert (again.checked, again.looked_up, again.updated) == (1, 0, 0)
    assert Receipt.objects.filter(source="poll").count() == 1


def test_messages_outside_the_day_are_not_checked(sandbox, make_message):
    message = send(make_message)
    Message.objects.filter(pk=message.pk).update(dispatched_at=timezone.now() - timedelta(days=2))
    assert reconciliation_run(day=today(), trigger="test").checked == 0


def test_unmatched_receipts_of_the_day_are_matched_again(sandbox, make_message):
    message = send(make_message)
    Message.objects.filter(pk=message.pk).update(provider_message_id="")  # as if our write had been lost
    receipt_record(
        event=ReceiptEvent(provider="twilio", event_id="orphan", provider_message_id="SMlater",
                           provider_status="delivered", state="delivered")
    )  # fmt: skip
    Message.objects.filter(pk=message.pk).update(provider_message_id="SMlater")
    run = reconciliation_run(day=today(), trigger="test")
    assert (run.unmatched_receipts, run.rematched_receipts) == (1, 1)
    assert Receipt.objects.get(event_id="orphan").message_id == message.pk
    assert Message.objects.get(pk=message.pk).state == "delivered"


@pytest.mark.django_db(transaction=True)
def test_a_second_run_while_one_holds_the_lock_does_nothing(make_message, other_session):
    with other_session() as other:
        other.execute("SELECT pg_advisory_lock(%s)", [cluster_lock_id(LOCK_NAME)])  # a run in another process
        assert reconciliation_run(day=today(), trigger="test") is None
        with pytest.raises(CommandError, match="Another reconciliation is running"):
            call_command("reconcile", "--date", str(today()), stdout=StringIO())
        assert not ReconciliationRun.objects.exists()
        other.execute("SELECT pg_advisory_unlock(%s)", [cluster_lock_id(LOCK_NAME)])
    assert reconciliation_run(day=today(), trigger="test").status == "completed"


def test_the_command_prints_the_report(sandbox, make_message):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    send(make_message)
    out = StringIO()
    call_command("reconcile", "--date", str(today()), stdout=out)
    text = out.getvalue()
    assert f"Reconciled {today()}" in text and "updated        1" in text and "missing_receipt 1" in text
    assert ReconciliationRun.objects.get().trigger.endswith("@manage.py")


def test_the_command_refuses_a_bad_date():
    with pytest.raises(CommandError, match="is not a date"):
        call_command("reconcile", "--date", "yesterday")


def test_the_nightly_job_is_scheduled():
    entry = django_settings.CELERY_BEAT_SCHEDULE["reconciliation.reconcile"]
    assert entry["task"] == "reconciliation.reconcile"
    assert entry["schedule"].hour == {2} and entry["schedule"].minute == {0}


def test_a_message_replayed_since_its_dispatch_is_left_to_its_new_send(sandbox, make_message):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    message = send(make_message)
    Message.objects.filter(pk=message.pk).update(state="accepted", send_generation=2)  # replayed, not sent yet
    run = reconciliation_run(day=today(), trigger="test")
    assert (run.checked, run.updated) == (0, 0)
    assert Message.objects.get(pk=message.pk).state == "accepted"


def test_an_unmatched_receipt_without_a_provider_reference_is_not_matched_to_anything(make_message):
    make_message(state="dispatched", provider="twilio", provider_message_id="", dispatched_at=timezone.now())
    receipt_record(
        event=ReceiptEvent(provider="twilio", event_id="blank", provider_message_id="", provider_status="delivered",
                           state="delivered")
    )  # fmt: skip
    run = reconciliation_run(day=today(), trigger="test")
    assert (run.unmatched_receipts, run.rematched_receipts) == (1, 0)
    assert Receipt.objects.get(event_id="blank").message_id is None


def test_a_provider_that_cannot_be_asked_leaves_the_message_unknown_and_says_so(sandbox, make_message):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    message = send(make_message)
    sandbox.faults(outage=True)
    run = reconciliation_run(day=today(), trigger="test")
    assert (run.looked_up, run.updated, run.still_unknown) == (1, 0, 1)
    assert run.mismatches == {"lookup_failed": 1}
    assert Message.objects.get(pk=message.pk).state == "dispatched"


@pytest.mark.django_db(transaction=True)
def test_a_run_that_breaks_is_stored_as_failed_and_frees_the_lock(sandbox, make_message, monkeypatch):
    sandbox.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    send(make_message)

    class Broken:
        def fetch_status(self, provider_message_id):
            raise RuntimeError("a bug in an adapter")

    with monkeypatch.context() as patch:
        patch.setattr("reconciliation.polling.get_provider", lambda name: Broken())
        with pytest.raises(RuntimeError):
            reconciliation_run(day=today(), trigger="test")
    failed = ReconciliationRun.objects.get()
    assert failed.status == "failed" and "a bug in an adapter" in failed.error and failed.finished_at
    assert reconciliation_run(day=today(), trigger="test").updated == 1  # the lock was released
