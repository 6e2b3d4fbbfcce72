"""Fallback on silence (messaging.silence): opt-in per category, exactly once, a copy through the
route's next provider, and the first provider's late receipts kept without moving the state back."""

from __future__ import annotations

import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.core.checks import run_checks
from django.db import connection
from django.utils import timezone

from messaging import silence
from messaging.models import AttemptOutcome, DispatchAttempt, Message, MessageEvent
from messaging.receipts import receipt_record
from messaging.services import message_transition
from messaging.silence import message_silence_fallback, messages_silence_claim, messages_silence_sweep
from messaging.states import MessageState, transition_allowed
from providers.types import ReceiptEvent

pytestmark = pytest.mark.django_db

OPTED_IN = {"otp": {"after_seconds": 60}}


@pytest.fixture
def opted_in(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "SILENCE_FALLBACK": OPTED_IN,
        "ROUTES": {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun"]},
    }


@pytest.fixture
def published(monkeypatch):
    """The copies' tasks published (the broker is not what is tested here)."""
    tasks: list[tuple[str, list, str]] = []
    monkeypatch.setattr(
        silence,
        "current_app",
        SimpleNamespace(send_task=lambda name, args, queue, retry: tasks.append((name, args, queue))),
    )
    return tasks


def sent(message, *, ago=120, provider="twilio", sid="SM1", state="dispatched"):
    """The message as a worker leaves it once `provider` took it under `sid`, `ago` seconds back."""
    at = timezone.now() - timedelta(seconds=ago)
    DispatchAttempt.objects.create(
        message=message,
        number=1,
        provider=provider,
        channel=message.channel,
        provider_message_id=sid,
        outcome=AttemptOutcome.ACCEPTED,
        started_at=at,
    )
    Message.objects.filter(pk=message.pk).update(
        state=state, provider=provider, provider_message_id=sid, dispatched_at=at, attempt_count=1
    )
    message.refresh_from_db()
    return message


def receipt(message, status, state, *, provider="twilio", sid="SM1"):
    return receipt_record(
        event=ReceiptEvent(
            provider=provider,
            event_id=f"{sid}:{status}",
            provider_message_id=sid,
            provider_status=status,
            state=state,
            message_id=str(message.pk),  # Twilio's callback URL and Vonage's client-ref carry it
            payload={"status": status},
        )
    )[0]


def test_off_by_default_nothing_is_claimed(make_message, published):
    message = sent(make_message(category="otp"))
    assert messages_silence_sweep() == 0
    assert Message.objects.get(pk=message.pk).silence_fallback_at is None and published == []


def test_only_opted_in_categories_silent_long_enough_are_claimed_once(opted_in, make_message, published):
    otp = sent(make_message(category="otp"))
    recent = sent(make_message(category="otp"), ago=10)
    marketing = sent(make_message(category="marketing"))
    delivered = sent(make_message(category="otp"), state="delivered")
    expired = sent(make_message(category="otp", expires_at=timezone.now() - timedelta(seconds=1)))
    assert messages_silence_sweep() == 1
    assert published == [(silence.SILENCE_FALLBACK_TASK, [str(otp.pk), "silence"], "sms.critical")]
    claimed = set(Message.objects.filter(silence_fallback_at__isnull=False).values_list("pk", flat=True))
    assert claimed == {otp.pk}
    assert {recent.pk, marketing.pk, delivered.pk, expired.pk}.isdisjoint(claimed)
    assert messages_silence_sweep() == 0  # exactly once
    assert len(published) == 1


@pytest.mark.django_db(transaction=True)
def test_two_sweeps_at_once_claim_each_message_once(opted_in, make_message):
    ids = [sent(make_message(category="otp")).pk for _ in range(20)]
    barrier = threading.Barrier(2)
    won: list[list] = [[], []]

    def claim(slot: int) -> None:
        try:
            barrier.wait()
            won[slot] = messages_silence_claim(message_ids=ids, reason="silence", states=("dispatched",))
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [c.message_id for c in won[0] + won[1]]
    assert sorted(claimed) == sorted(ids)  # every one claimed, none twice


def test_the_copy_goes_through_the_next_provider_with_its_own_token(opted_in, sandbox, make_message, published):
    message = sent(make_message(category="otp"))
    messages_silence_sweep()
    assert message_silence_fallback(message_id=message.pk, reason="silence")
    message.refresh_from_db()
    assert message.state == "dispatched" and message.provider == "vonage" and message.provider_message_id
    assert message.silence_fallback_at and message.send_generation == 2
    [copy] = sandbox.requests(provider="vonage")
    assert copy["message_id"] == str(message.pk)
    copy_attempt = message.attempts.get(provider="vonage")
    assert copy_attempt.outcome == "accepted" and copy_attempt.send_generation == 2
    assert copy_attempt.note == "silence fallback after twilio (silence)"
    event = message.events.get(source="fallback")
    assert "no final receipt from twilio in time" in event.detail and "sent again through vonage" in event.detail
    # A redelivered task sends nothing more.
    assert not message_silence_fallback(message_id=message.pk, reason="silence")
    assert len(sandbox.requests(provider="vonage")) == 1


def test_an_unclaimed_message_is_never_sent_again(opted_in, sandbox, make_message):
    message = sent(make_message(category="otp"))
    assert not message_silence_fallback(message_id=message.pk, reason="silence")
    assert sandbox.requests(provider="vonage") == []


def test_with_no_next_hop_nothing_is_sent_and_the_timeline_says_why(opted_in, settings, sandbox, make_message):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {"sms": ["twilio"]}}
    message = sent(make_message(category="otp"))
    messages_silence_claim(message_ids=[message.pk], reason="silence", states=("dispatched",))
    assert not message_silence_fallback(message_id=message.pk, reason="silence")
    assert "no provider or channel after twilio" in message.events.get(source="fallback").detail
    assert sandbox.requests() == []


def test_an_undelivered_receipt_triggers_the_copy_at_once(
    opted_in, sandbox, make_message, published, django_capture_on_commit_callbacks
):
    message = sent(make_message(category="otp"), ago=1)
    with django_capture_on_commit_callbacks(execute=True):
        receipt(message, "undelivered", "undelivered")
    message.refresh_from_db()
    assert message.state == "undelivered" and message.silence_fallback_at
    assert published == [(silence.SILENCE_FALLBACK_TASK, [str(message.pk), "undelivered"], "sms.critical")]
    assert message_silence_fallback(message_id=message.pk, reason="undelivered")
    message.refresh_from_db()
    assert message.state == "dispatched" and message.provider == "vonage"
    back = message.events.get(source="fallback", applied=True)
    assert (back.from_state, back.to_state) == ("undelivered", "dispatched")
    assert "twilio reported it undelivered" in back.detail
    # The copy's receipt ends it delivered.
    receipt(message, "delivered", "delivered", provider="vonage", sid=message.provider_message_id)
    assert Message.objects.get(pk=message.pk).state == "delivered"


def test_an_undelivered_message_of_a_category_not_opted_in_stays_undelivered(
    opted_in, make_message, published, django_capture_on_commit_callbacks
):
    message = sent(make_message(category="marketing"), ago=1)
    with django_capture_on_commit_callbacks(execute=True):
        receipt(message, "undelivered", "undelivered")
    message.refresh_from_db()
    assert message.state == "undelivered" and message.silence_fallback_at is None and published == []


def test_the_copy_undelivered_too_is_final(
    opted_in, sandbox, make_message, published, django_capture_on_commit_callbacks
):
    message = sent(make_message(category="otp"), ago=1)
    with django_capture_on_commit_callbacks(execute=True):
        receipt(message, "undelivered", "undelivered")
    message_silence_fallback(message_id=message.pk, reason="undelivered")
    message.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        receipt(message, "failed", "undelivered", provider="vonage", sid=message.provider_message_id)
    assert Message.objects.get(pk=message.pk).state == "undelivered"
    assert len(published) == 1  # once


def test_a_late_first_receipt_is_recorded_and_never_moves_the_state_back(opted_in, sandbox, make_message, published):
    message = sent(make_message(category="otp"))
    messages_silence_sweep()
    message_silence_fallback(message_id=message.pk, reason="silence")
    copy_id = Message.objects.get(pk=message.pk).provider_message_id

    late_failure = receipt(message, "undelivered", "undelivered")
    message.refresh_from_db()
    assert message.state == "dispatched" and not late_failure.applied and late_failure.message_id == message.pk
    kept = message.events.get(to_state="undelivered")
    assert not kept.applied and kept.detail.startswith("late receipt from twilio after silence fallback")

    # The first copy delivered after all: the recipient has it, and the message names that copy.
    late_delivery = receipt(message, "delivered", "delivered")
    message.refresh_from_db()
    assert late_delivery.applied and message.state == "delivered"
    assert (message.provider, message.provider_message_id) == ("twilio", "SM1")
    assert (
        "late receipt from twilio after silence fallback: delivered" in message.events.get(to_state="delivered").detail
    )

    # The copy's own failure afterwards moves nothing back; its delivery is a repeat, shown all the same.
    receipt(message, "failed", "undelivered", provider="vonage", sid=copy_id)
    assert Message.objects.get(pk=message.pk).state == "delivered"
    assert message.events.filter(applied=False, detail__contains="late receipt from vonage").exists()


def test_a_late_first_delivery_after_the_copy_delivered_is_shown_not_applied(
    opted_in, sandbox, make_message, published
):
    message = sent(make_message(category="otp"))
    messages_silence_sweep()
    message_silence_fallback(message_id=message.pk, reason="silence")
    copy_id = Message.objects.get(pk=message.pk).provider_message_id
    receipt(message, "delivered", "delivered", provider="vonage", sid=copy_id)
    late = receipt(message, "delivered", "delivered")
    message.refresh_from_db()
    assert message.state == "delivered" and not late.applied
    assert (message.provider, message.provider_message_id) == ("vonage", copy_id)  # the copy that delivered
    shown = message.events.get(applied=False, to_state="delivered")
    assert shown.detail.startswith("late receipt from twilio after silence fallback: delivered")


def test_only_the_fallback_may_move_an_undelivered_message_back_to_dispatched(make_message):
    assert transition_allowed(from_state="undelivered", to_state="dispatched", source="fallback")
    assert not transition_allowed(from_state="undelivered", to_state="dispatched", source="webhook")
    message = sent(make_message(), state="undelivered")
    for source in ("worker", "webhook", "poll"):
        assert not message_transition(message_id=message.pk, to_state=MessageState.DISPATCHED, source=source)
    assert Message.objects.get(pk=message.pk).state == "undelivered"
    assert MessageEvent.objects.filter(message=message, applied=False, to_state="dispatched").count() == 3


@pytest.mark.parametrize(
    "value",
    [
        {"otp": {"after_seconds": 0}},
        {"otp": {"after": 60}},
        {"otp": 60},
        {"": {"after_seconds": 60}},
        {"otp": {"after_seconds": True}},
    ],
)
def test_a_setting_that_cannot_work_stops_start_up(settings, value):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SILENCE_FALLBACK": value}
    assert "conductor.E100" in {error.id for error in run_checks()}


def test_a_good_setting_passes_the_checks(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SILENCE_FALLBACK": {"otp": {"after_seconds": 45.5}}}
    assert "conductor.E100" not in {error.id for error in run_checks()}


def test_the_api_shows_when_a_copy_was_sent(opted_in, sandbox, make_message, api, published):
    message = sent(make_message(category="otp"))
    assert api.get(f"/api/v1/messages/{message.pk}/").json()["silence_fallback_at"] is None
    messages_silence_sweep()
    message_silence_fallback(message_id=message.pk, reason="silence")
    body = api.get(f"/api/v1/messages/{message.pk}/").json()
    assert body["silence_fallback_at"] and body["provider"] == "vonage"
    assert any(e["source"] == "fallback" for e in body["events"])


def test_the_sweep_runs_it(opted_in, make_message, published):
    from messaging.sweeper import messages_sweep

    sent(make_message(category="otp"))
    assert messages_sweep().silence_fallbacks == 1
    assert messages_sweep().silence_fallbacks == 0


def test_undelivered_while_the_silence_copy_is_on_its_way_claims_nothing_more(
    opted_in, sandbox, make_message, published, django_capture_on_commit_callbacks
):
    message = sent(make_message(category="otp"))
    messages_silence_sweep()
    with django_capture_on_commit_callbacks(execute=True):
        receipt(message, "undelivered", "undelivered")  # before the copy went: the first send's own
    assert Message.objects.get(pk=message.pk).state == "undelivered" and len(published) == 1
    assert message_silence_fallback(message_id=message.pk, reason="silence")
    message.refresh_from_db()
    assert message.state == "dispatched" and message.provider == "vonage"
    assert len(sandbox.requests(provider="vonage")) == 1


def test_the_admin_shows_and_filters_the_messages_a_copy_was_sent_for(opted_in, client, make_message, published):
    from django.contrib.auth.models import User
    from django.urls import reverse

    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests"))
    copied = sent(make_message(category="otp"))
    messages_silence_sweep()
    plain = sent(make_message(category="otp"), ago=1)
    listing = client.get(reverse("admin:messaging_message_changelist"), {"silence_fallback": "yes"})
    assert listing.status_code == 200
    page = listing.content.decode()
    assert str(copied.pk) in page and str(plain.pk) not in page
    detail = client.get(reverse("admin:messaging_message_change", args=[copied.pk])).content.decode()
    assert "Silence fallback at" in detail
