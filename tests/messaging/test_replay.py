"""The replay service: a new generation and budget, the deadline policy, once per dead letter."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.lookup import send_request
from messaging.models import AttemptOutcome, DeadLetter, DispatchAttempt, EventSource, Message, MessageEvent, Receipt
from messaging.replay import SkipReason, dead_letters_replay, replay_deadline
from messaging.routing import DEFAULT_RETRY_POLICIES, Hop, ReplayDeadline
from messaging.selectors import DeadLetterCriteria, dead_letters_matching
from providers.registry import get_provider

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def replay(*dead_letters, **options):
    selection = DeadLetter.objects.filter(pk__in=[d.pk for d in dead_letters]).order_by("created_at", "pk")
    return dead_letters_replay(selection=selection, actor=options.pop("actor", "ops"), via=EventSource.ADMIN, **options)


# --- the deadline policy (pure) ---------------------------------------------------------------------
def deadline(priority, *, expires_in, sender=False, force=False, lifetime=timedelta(minutes=5), **policy):
    expires_at = NOW + expires_in
    chosen = DEFAULT_RETRY_POLICIES[priority]
    if policy:
        from dataclasses import replace

        chosen = replace(chosen, **policy)
    return replay_deadline(
        now=NOW,
        expires_at=expires_at,
        created_at=expires_at - lifetime,
        deadline_from_sender=sender,
        policy=chosen,
        force=force,
    )


def test_a_critical_message_keeps_its_deadline_and_is_not_resent_past_it():
    assert deadline("critical", expires_in=timedelta(minutes=2)) == NOW + timedelta(minutes=2)
    assert deadline("critical", expires_in=-timedelta(seconds=1)) is None
    # forced: a fresh deadline as long as its original lifetime
    assert deadline("critical", expires_in=-timedelta(hours=3), force=True) == NOW + timedelta(minutes=5)


def test_transactional_and_bulk_get_a_fresh_default_deadline():
    assert deadline("transactional", expires_in=-timedelta(days=3)) == NOW + timedelta(hours=24)
    assert deadline("bulk", expires_in=timedelta(hours=1)) == NOW + timedelta(hours=72)


def test_a_deadline_the_sender_gave_is_kept_whatever_the_policy():
    assert deadline("bulk", expires_in=timedelta(hours=1), sender=True) == NOW + timedelta(hours=1)
    assert deadline("bulk", expires_in=-timedelta(hours=1), sender=True) is None
    forced = deadline("bulk", expires_in=-timedelta(hours=1), sender=True, force=True, lifetime=timedelta(hours=2))
    assert forced == NOW + timedelta(hours=2)


def test_the_policy_is_a_setting():
    assert deadline(
        "critical", expires_in=-timedelta(hours=1), replay_deadline=ReplayDeadline.RENEW
    ) == NOW + timedelta(minutes=5)
    assert deadline("bulk", expires_in=-timedelta(hours=1), replay_deadline=ReplayDeadline.KEEP) is None


# --- the service ------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_replay_starts_a_new_generation_with_a_fresh_budget(park):
    dead_letter = park(priority="transactional", failed_rounds=10, worker_loss_count=2)
    report = replay(dead_letter, actor="alice")
    assert (report.selected, report.replayed, dict(report.skipped)) == (1, 1, {})
    message = Message.objects.get(pk=dead_letter.message_id)
    assert message.state == "accepted" and message.send_generation == 2 and message.send_token.endswith(".2")
    assert (message.failed_rounds, message.worker_loss_count, message.needs_provider_lookup) == (0, 0, False)
    assert message.last_error_type == "" and message.next_attempt_at is None and message.enqueued_at
    assert message.expires_at > timezone.now() + timedelta(hours=23)  # transactional: renewed
    dead_letter.refresh_from_db()
    assert not dead_letter.is_parked and dead_letter.replayed_by == "alice" and dead_letter.replayed_via == "admin"
    assert dead_letter.replay_id == report.replay_id
    event = MessageEvent.objects.filter(message=message).latest("id")
    assert (event.from_state, event.to_state, event.source) == ("dead_lettered", "accepted", "admin")
    assert "replayed by alice" in event.detail and str(report.replay_id) in event.detail


@pytest.mark.django_db
def test_failed_and_expired_messages_replay_too(park):
    failed = park(state="failed", error_type="provider_auth", priority="bulk")
    expired = park(state="expired", error_type="expired", priority="bulk")
    assert replay(failed, expired).replayed == 2
    assert set(Message.objects.values_list("state", flat=True)) == {"accepted"}


@pytest.mark.django_db
def test_a_dead_letter_is_replayed_once(park):
    dead_letter = park()
    assert replay(dead_letter).replayed == 1
    again = replay(dead_letter)
    assert again.replayed == 0 and again.skipped == {SkipReason.ALREADY_REPLAYED: 1}
    assert Message.objects.get(pk=dead_letter.message_id).send_generation == 2
    # and a parked-only selection no longer finds it
    assert not dead_letters_matching(criteria=DeadLetterCriteria(parked=True)).exists()


@pytest.mark.django_db
def test_a_replayed_message_that_dies_again_is_parked_again_under_its_new_generation(park):
    from messaging.services import message_transition

    dead_letter = park()
    replay(dead_letter)
    message_transition(message_id=dead_letter.message_id, to_state="dead_lettered", source=EventSource.WORKER)
    generations = list(DeadLetter.objects.order_by("send_generation").values_list("send_generation", "replayed_at"))
    assert [g for g, _ in generations] == [1, 2] and generations[1][1] is None


@pytest.mark.django_db
def test_a_critical_message_past_its_deadline_is_skipped_unless_forced(park):
    stale = park(priority="critical", expires_at=timezone.now() - timedelta(minutes=1))
    report = replay(stale)
    assert report.replayed == 0 and report.skipped == {SkipReason.PAST_DEADLINE: 1}
    stale.refresh_from_db()
    assert stale.is_parked and Message.objects.get(pk=stale.message_id).state == "dead_lettered"
    forced = replay(stale, force=True)
    assert forced.replayed == 1
    assert Message.objects.get(pk=stale.message_id).expires_at > timezone.now()


@pytest.mark.django_db
def test_a_dry_run_counts_and_changes_nothing(park):
    fresh = park(priority="bulk")
    stale = park(priority="critical", expires_at=timezone.now() - timedelta(minutes=1))
    report = replay(fresh, stale, dry_run=True)
    assert (report.selected, report.replayed, dict(report.skipped)) == (2, 1, {SkipReason.PAST_DEADLINE: 1})
    assert report.message_ids == [str(fresh.message_id)]
    assert DeadLetter.objects.filter(replayed_at__isnull=True).count() == 2
    assert set(Message.objects.values_list("state", flat=True)) == {"dead_lettered"}


@pytest.mark.django_db
def test_a_message_a_receipt_says_arrived_is_not_resent_unless_forced(park):
    dead_letter = park(state="dead_lettered", error_type="worker_lost", outcome="worker_lost")
    Receipt.objects.create(
        provider="twilio",
        event_id="late",
        message_id=dead_letter.message_id,
        provider_message_id="SM9",
        provider_status="delivered",
        mapped_state="delivered",
        received_at=timezone.now(),
    )
    assert replay(dead_letter).skipped == {SkipReason.ARRIVED: 1}
    assert replay(dead_letter, force=True).replayed == 1


@pytest.mark.django_db
def test_a_message_that_moved_on_keeps_its_dead_letter_parked(park):
    dead_letter = park()
    Message.objects.filter(pk=dead_letter.message_id).update(send_generation=5)  # someone else replayed it
    report = replay(dead_letter)
    assert report.skipped == {SkipReason.MOVED_ON: 1}
    dead_letter.refresh_from_db()
    assert dead_letter.is_parked  # the claim was rolled back with the refused transition


@pytest.mark.django_db
def test_the_published_task_goes_out_on_commit(park, django_capture_on_commit_callbacks, monkeypatch):
    published = []
    monkeypatch.setattr("messaging.replay.message_publish", lambda **kwargs: published.append(kwargs))
    dead_letter = park(channel="whatsapp", priority="bulk")
    with django_capture_on_commit_callbacks(execute=True):
        replay(dead_letter)
    assert published == [{"message_id": dead_letter.message_id, "channel": "whatsapp", "priority": "bulk"}]


# --- replay, then the real send path against the sandbox ------------------------------------------
@pytest.fixture
def twilio_only(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {**settings.CONDUCTOR["ROUTES"], "sms": ["twilio"]}}


@pytest.mark.django_db
def test_a_replayed_message_is_sent_with_its_new_token(sandbox, park, twilio_only):
    dead_letter = park(body="replay me", priority="bulk")
    replay(dead_letter)
    messages_dispatch(message_ids=[str(dead_letter.message_id)])
    message = Message.objects.get(pk=dead_letter.message_id)
    assert message.state == "dispatched"
    [sent] = sandbox.requests(message_id=str(message.pk))
    assert sent["token"] == f"{message.pk}.2" and sent["accepted"]


def _given_up_after_the_provider_took_it(park, sandbox, body):
    """A message whose worker died right after Twilio accepted it: parked as worker_lost."""
    dead_letter = park(body=body, priority="bulk", error_type="worker_lost", outcome="worker_lost")
    message = Message.objects.get(pk=dead_letter.message_id)
    get_provider("twilio").send(send_request(message, Hop("sms", message.to, "twilio")))
    return dead_letter


@pytest.mark.django_db
def test_replaying_an_unknown_outcome_asks_the_provider_first_and_does_not_resend(sandbox, park, twilio_only):
    dead_letter = _given_up_after_the_provider_took_it(park, sandbox, "taken before the worker died")
    assert dead_letter.unknown_outcome
    replay(dead_letter)
    message = Message.objects.get(pk=dead_letter.message_id)
    assert message.needs_provider_lookup
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched"
    last = DispatchAttempt.objects.filter(message=message).latest("number")
    assert last.outcome == AttemptOutcome.FOUND_AT_PROVIDER and last.send_generation == 1
    assert len(sandbox.requests(message_id=str(message.pk), accepted="true")) == 1  # not sent twice


@pytest.mark.django_db
def test_replaying_an_unknown_outcome_the_provider_never_saw_sends_it(sandbox, park, twilio_only):
    dead_letter = park(body="never arrived", priority="bulk", error_type="worker_lost", outcome="worker_lost")
    replay(dead_letter)
    messages_dispatch(message_ids=[str(dead_letter.message_id)])
    attempts = DispatchAttempt.objects.filter(message_id=dead_letter.message_id).order_by("number")
    assert [a.outcome for a in attempts][-2:] == ["not_found_at_provider", "accepted"]
    [sent] = sandbox.requests(message_id=str(dead_letter.message_id))
    assert sent["token"].endswith(".2")


@pytest.mark.django_db
def test_replaying_an_smtp_send_of_unknown_outcome_is_the_operators_call_to_resend(park):
    dead_letter = park(
        channel="email", to="ada@example.com", provider="smtp", error_type="provider_timeout", outcome="ambiguous"
    )
    assert dead_letter.unknown_outcome
    replay(dead_letter)
    assert not Message.objects.get(pk=dead_letter.message_id).needs_provider_lookup  # SMTP cannot be asked


# --- two replays at the same moment ---------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_replays_replay_each_dead_letter_once(park):
    dead_letters = [park(priority="bulk", body=f"race {n}") for n in range(60)]
    start = threading.Barrier(2)
    reports = []

    def run(actor):
        try:
            start.wait()
            reports.append(
                dead_letters_replay(
                    selection=dead_letters_matching(criteria=DeadLetterCriteria(parked=True)),
                    actor=actor,
                    via=EventSource.API,
                )
            )
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(reports) == 2
    assert sum(r.replayed for r in reports) == len(dead_letters)
    assert sorted(Message.objects.values_list("send_generation", flat=True).distinct()) == [2]
    assert DeadLetter.objects.filter(replayed_at__isnull=True).count() == 0
    replayed_messages = [m for r in reports for m in r.message_ids]
    assert len(replayed_messages) == len(set(replayed_messages)) == len(dead_letters)
    events = MessageEvent.objects.filter(to_state="accepted", from_state="dead_lettered", applied=True)
    assert events.count() == len(dead_letters)
