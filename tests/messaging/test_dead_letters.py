"""Parking: every path that gives up on a message leaves one dead letter with the full context."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.models import DeadLetter, DispatchAttempt, ErrorType, EventSource, Message
from messaging.receipts import receipt_record
from messaging.services import message_cancel, message_transition
from messaging.sweeper import messages_sweep
from providers.types import ReceiptEvent

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def single_provider_routes(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio"], "whatsapp": ["twilio"], "email": ["smtp"]},
    }


def test_a_permanent_refusal_parks_the_message_with_its_payload_and_attempt(sandbox, make_message):
    message = make_message(to="+1234", category="otp", metadata={"user": 7})  # the sandbox refuses it: 21211
    messages_dispatch(message_ids=[str(message.pk)])
    dead_letter = DeadLetter.objects.get(message=message)
    assert (dead_letter.state, dead_letter.error_type, dead_letter.error_code) == (
        "failed",
        "invalid_recipient",
        "21211",
    )
    assert dead_letter.provider == "twilio" and dead_letter.client_id == message.client_id
    assert (dead_letter.channel, dead_letter.priority, dead_letter.category) == ("sms", "critical", "otp")
    assert dead_letter.send_generation == 1 and dead_letter.is_parked and not dead_letter.unknown_outcome
    payload = dead_letter.payload
    assert (payload["to"], payload["body"], payload["metadata"]) == ("+1234", "code 1", {"user": 7})
    assert payload["expires_at"] and payload["deadline_from_sender"] is False
    [attempt] = dead_letter.attempts
    assert attempt["provider"] == "twilio" and attempt["outcome"] == "permanent_error"
    assert attempt["error_type"] == "invalid_recipient" and attempt["error_code"] == "21211"
    assert attempt["started_at"] and attempt["ended_at"] and attempt["latency_ms"] is not None


def test_exhausted_retries_park_every_attempt_and_the_final_error(sandbox, make_message):
    sandbox.faults(error_rate=1.0)
    message = make_message(failed_rounds=4)  # critical allows 6 rounds
    for _ in range(2):
        Message.objects.filter(pk=message.pk).update(next_attempt_at=None)
        messages_dispatch(message_ids=[str(message.pk)])
    dead_letter = DeadLetter.objects.get(message=message)
    assert dead_letter.state == "dead_lettered" and dead_letter.error_type == "provider_5xx"
    assert "6 rounds of attempts failed" in dead_letter.error_message
    assert [a["outcome"] for a in dead_letter.attempts] == ["transient_error", "transient_error"]
    assert dead_letter.created_at == Message.objects.get(pk=message.pk).dead_lettered_at


def test_a_message_that_kept_killing_its_worker_is_parked_with_an_unknown_outcome(sandbox, make_message):
    message = make_message()
    for number in (1, 2, 3):
        DispatchAttempt.objects.create(message=message, number=number, provider="twilio", started_at=timezone.now())
    messages_dispatch(message_ids=[str(message.pk)])
    dead_letter = DeadLetter.objects.get(message=message)
    assert dead_letter.error_type == "worker_lost" and dead_letter.unknown_outcome
    assert [a["outcome"] for a in dead_letter.attempts] == ["worker_lost"] * 3


def test_expiry_parks_the_message_keeping_the_last_provider_error(make_message):
    message = make_message(
        expires_at=timezone.now() - timedelta(seconds=1),
        last_error_type=ErrorType.PROVIDER_5XX,
        last_error_code="500",
        last_error_message="twilio answered 500",
    )
    assert messages_sweep().expired == 1
    dead_letter = DeadLetter.objects.get(message=message)
    assert (dead_letter.state, dead_letter.error_type, dead_letter.error_code) == ("expired", "expired", "500")
    assert dead_letter.error_message == "twilio answered 500"
    assert dead_letter.reason == "deadline passed before dispatch"


def test_a_worker_that_finds_the_deadline_passed_parks_it_too(sandbox, make_message):
    message = make_message(expires_at=timezone.now() - timedelta(seconds=1))
    messages_dispatch(message_ids=[str(message.pk)])
    assert DeadLetter.objects.get(message=message).error_type == "expired"
    assert sandbox.requests() == []


def test_an_unknown_outcome_at_smtp_is_parked_for_an_operator(make_message):
    message = make_message(channel="email", to="ada@example.com", subject="hi", needs_provider_lookup=True)
    messages_dispatch(message_ids=[str(message.pk)])
    dead_letter = DeadLetter.objects.get(message=message)
    assert dead_letter.error_code == "no_lookup" and dead_letter.unknown_outcome


def test_a_failed_receipt_after_dispatch_parks_the_message(make_message):
    message = make_message(state="dispatched", provider="twilio", provider_message_id="SM1")
    event = ReceiptEvent(
        provider="twilio", event_id="e1", provider_message_id="SM1", provider_status="failed", state="failed",
        error_code="30008",
    )  # fmt: skip
    receipt_record(event=event)
    dead_letter = DeadLetter.objects.get(message=message)
    assert (dead_letter.error_type, dead_letter.error_code) == ("rejected", "30008")
    assert "reported failed" in dead_letter.error_message


def test_messages_that_reach_the_recipient_or_are_cancelled_are_not_parked(make_message):
    delivered = make_message()
    message_transition(message_id=delivered.pk, to_state="dispatched", source=EventSource.WORKER)
    message_transition(message_id=delivered.pk, to_state="delivered", source=EventSource.WEBHOOK)
    message_cancel(message=make_message())
    assert not DeadLetter.objects.exists()


def test_a_refused_transition_parks_nothing(make_message):
    message = make_message(state="delivered")
    assert not message_transition(message_id=message.pk, to_state="dead_lettered", source=EventSource.WORKER)
    assert not DeadLetter.objects.exists()


def test_one_dead_letter_per_generation(park):
    dead_letter = park()
    Message.objects.filter(pk=dead_letter.message_id).update(state="accepted")  # as if it never left
    with pytest.raises(Exception, match="dead_letter_once_per_generation"):
        message_transition(message_id=dead_letter.message_id, to_state="dead_lettered", source=EventSource.WORKER)


def test_parked_dead_letters_are_counted_in_metrics(client, park):
    from django.utils import timezone as tz

    park(error_type="provider_timeout")
    park(error_type="provider_timeout")
    replayed = park(error_type="invalid_recipient", state="failed")
    DeadLetter.objects.filter(pk=replayed.pk).update(replayed_at=tz.now())
    page = client.get("/metrics").content.decode()
    assert 'conductor_dead_letters{channel="sms",error_type="provider_timeout"} 2.0' in page
    assert 'conductor_dead_letters{channel="sms",error_type="invalid_recipient"}' not in page  # replayed
