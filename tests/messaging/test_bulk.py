"""The send path with a batch (a campaign's) in-process against the sandbox over real HTTP: claimed,
sent concurrently and recorded in a few statements, with the guarantees of a message sent alone."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest
from django.db import DatabaseError
from django.utils import timezone

from messaging import dispatch
from messaging.dispatch import messages_dispatch
from messaging.models import AttemptOutcome, DeadLetter, DispatchAttempt, Message, MessageEvent
from messaging.publish import messages_publish
from providers.guards import circuit_breaker, reset_guards
from providers.twilio import TwilioProvider

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def routes(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun"]},
    }


@pytest.fixture
def handed_back(monkeypatch):
    """Messages the batch gave back to the per-message task (the broker is not needed here)."""
    published: list[str] = []
    monkeypatch.setattr(
        "messaging.dispatch.message_publish", lambda *, message_id, channel, priority: published.append(str(message_id))
    )
    return published


@pytest.fixture
def leases(monkeypatch) -> list:
    """The lease of every claim the test's batches make."""
    noted, claim = [], dispatch._claim

    def claim_and_note_the_lease(message_ids, fair_channel=None):
        lease, *claimed = claim(message_ids, fair_channel)
        noted.append(lease)
        return lease, *claimed

    monkeypatch.setattr(dispatch, "_claim", claim_and_note_the_lease)
    return noted


def campaign(make_message, count: int, **fields) -> list[Message]:
    return [
        make_message(to=f"+1415555{1000 + i:04d}", body=f"sale {i}", priority="bulk", **fields) for i in range(count)
    ]


def ids(messages) -> list[str]:
    return [str(m.pk) for m in messages]


def hops(message) -> list[tuple[str, str]]:
    return list(message.attempts.order_by("number").values_list("provider", "outcome"))


def test_a_batch_is_sent_once_each_and_recorded_in_a_few_statements(
    sandbox, make_message, django_assert_max_num_queries
):
    messages = campaign(make_message, 60)
    # the claim (lock, lost-attempt check, suppression look-up, attempt keys, lease and counters,
    # attempt rows), the attempts' outcomes, the transition (lock, update, events), and the
    # savepoints of the two transactions: 14 for 60 messages or 6,000; nothing more to release in
    # a healthy batch
    with django_assert_max_num_queries(14):
        assert messages_dispatch(message_ids=ids(messages)) == 60
    rows = Message.objects.filter(pk__in=ids(messages))
    assert Counter(rows.values_list("state", flat=True)) == {"dispatched": 60}
    assert not rows.filter(lease_expires_at__isnull=False).exists()
    sent = sandbox.requests(provider="twilio")
    assert Counter(r["message_id"] for r in sent) == Counter({m: 1 for m in ids(messages)})
    for message in rows:
        [attempt] = message.attempts.all()
        assert attempt.outcome == "accepted" and attempt.provider_message_id == message.provider_message_id
        assert attempt.latency_ms is not None and attempt.ended_at >= attempt.started_at
        assert message.attempt_count == 1 and message.provider == "twilio" and message.dispatched_at
        assert list(message.events.values_list("from_state", "to_state", "applied")) == [
            ("accepted", "dispatched", True)
        ]
    tokens = {r["token"] for r in sent}
    assert tokens == {f"{m}.1" for m in ids(messages)}


def test_a_second_task_for_the_same_ids_sends_nothing(sandbox, make_message):
    messages = campaign(make_message, 5)
    messages_dispatch(message_ids=ids(messages))
    assert messages_dispatch(message_ids=ids(messages)) == 0
    assert len(sandbox.requests(provider="twilio")) == 5


@pytest.mark.django_db(transaction=True)
def test_batches_sharing_messages_at_once_send_each_once_without_a_deadlock(sandbox, make_message):
    """The sweeper publishes a backlog older than the stale time again, in batches that overlap the
    queued originals; two of them can run at once. Each writer locks in key order (messaging.rows)."""
    import threading

    from django.db import connection

    messages = campaign(make_message, 240)
    batches = [ids(messages[:120]), ids(messages[60:180])[::-1], ids(messages[120:]), ids(messages[::2])]
    start = threading.Barrier(len(batches))
    claimed: list[int] = []
    errors: list[BaseException] = []

    def run(batch: list[str]) -> None:
        try:
            start.wait(timeout=10)
            claimed.append(messages_dispatch(message_ids=batch))
        except BaseException as exc:  # a deadlock surfaces here as OperationalError
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sum(claimed) == 240
    assert Counter(Message.objects.values_list("state", flat=True)) == {"dispatched": 240}
    sent = Counter(r["message_id"] for r in sandbox.requests(provider="twilio"))
    assert sent == Counter({m: 1 for m in ids(messages)})


def test_leased_and_not_yet_due_messages_are_left_alone(sandbox, make_message):
    leased = campaign(make_message, 2, lease_expires_at=timezone.now() + timedelta(seconds=30))
    later = make_message(priority="bulk", next_attempt_at=timezone.now() + timedelta(seconds=30))
    assert messages_dispatch(message_ids=ids(leased) + [str(later.pk)]) == 0
    assert sandbox.requests() == []


def test_messages_needing_more_than_a_send_go_back_to_the_per_message_task(sandbox, make_message, handed_back):
    plain = campaign(make_message, 3)
    expired = make_message(priority="bulk", expires_at=timezone.now() - timedelta(seconds=1))
    unknown = make_message(priority="bulk", needs_provider_lookup=True)
    ordered = make_message(priority="bulk", ordering_key="order-1", sequence=1)
    lost = make_message(priority="bulk")
    DispatchAttempt.objects.create(
        message=lost, number=1, provider="twilio", started_at=timezone.now(), outcome=AttemptOutcome.IN_PROGRESS
    )
    special = [expired, unknown, ordered, lost]
    messages_dispatch(message_ids=ids(plain + special))
    assert sorted(handed_back) == sorted(ids(special))
    assert {r["message_id"] for r in sandbox.requests()} == set(ids(plain))
    for message in Message.objects.filter(pk__in=ids(special)):
        # Unleased and marked published: the per-message task claims it, the sweeper does not double it.
        assert message.state == "accepted" and message.lease_expires_at is None and message.enqueued_at


def test_a_message_needing_more_than_a_send_claimed_alone_is_settled_by_the_same_core(
    sandbox, make_message, handed_back
):
    # A batch of one (a critical message's task, or a campaign's straggler) settles it in place.
    expired = make_message(priority="bulk", expires_at=timezone.now() - timedelta(seconds=1))
    assert messages_dispatch(message_ids=ids([expired])) == 1
    lost = make_message(priority="bulk")
    DispatchAttempt.objects.create(
        message=lost, number=1, provider="twilio", started_at=timezone.now(), outcome=AttemptOutcome.IN_PROGRESS
    )
    Message.objects.filter(pk=lost.pk).update(attempt_count=1)
    messages_dispatch(message_ids=ids([lost]))
    assert handed_back == []
    expired.refresh_from_db()
    lost.refresh_from_db()
    assert expired.state == "expired" and sandbox.requests(message_id=str(expired.pk)) == []
    # never sent before: looked up (nothing there), then sent once
    assert lost.state == "dispatched" and hops(lost) == [
        ("twilio", "worker_lost"),
        ("twilio", "not_found_at_provider"),
        ("twilio", "accepted"),
    ]
    assert len(sandbox.requests(message_id=str(lost.pk))) == 1


def test_a_claim_that_fails_midway_leaves_the_batch_as_it_was_for_the_sweeper(
    sandbox, make_message, handed_back, monkeypatch
):
    # The claim leases, counts and writes the first round's attempts in one transaction: if any
    # of it fails (here the attempts' COPY), none of it stays, nothing is sent or handed on, and
    # the messages keep their publish time, so the sweeper publishes them again when it is stale.
    plain = campaign(make_message, 3)
    special = make_message(priority="bulk", needs_provider_lookup=True)
    published_at = {m.pk: m.enqueued_at for m in [*plain, special]}

    def failing_copy(*args, **kwargs):
        raise DatabaseError("COPY failed")

    monkeypatch.setattr("messaging.outcomes.rows_insert", failing_copy)
    with pytest.raises(DatabaseError):
        messages_dispatch(message_ids=ids([*plain, special]))
    assert handed_back == [] and sandbox.requests() == []
    assert not DispatchAttempt.objects.filter(message__in=[*plain, special]).exists()
    for message in Message.objects.filter(pk__in=published_at):
        assert message.state == "accepted" and message.lease_expires_at is None and message.attempt_count == 0
        assert message.enqueued_at == published_at[message.pk] and not message.provider


def test_transient_errors_move_the_batch_to_the_next_provider(sandbox, make_message):
    sandbox.faults("twilio", error_rate=1.0)
    messages = campaign(make_message, 20)
    messages_dispatch(message_ids=ids(messages))
    for message in Message.objects.filter(pk__in=ids(messages)):
        assert message.state == "dispatched" and message.provider == "vonage"
        assert hops(message) == [("twilio", "transient_error"), ("vonage", "accepted")]
        assert "fallback after twilio (provider_5xx)" in message.attempts.get(provider="vonage").note
    assert len(sandbox.requests(provider="vonage", accepted="true")) == 20


def test_an_open_circuit_is_skipped_without_a_call(sandbox, make_message):
    breaker = circuit_breaker("twilio")
    for _ in range(10):
        breaker.record(breaker.allow(priority="bulk"), failed=True, duration_s=0.01)
    messages = campaign(make_message, 5)
    messages_dispatch(message_ids=ids(messages))
    assert sandbox.requests(provider="twilio") == []
    for message in Message.objects.filter(pk__in=ids(messages)):
        assert hops(message) == [("twilio", "skipped"), ("vonage", "accepted")]


def test_when_every_provider_fails_each_message_waits_for_its_retry(sandbox, make_message):
    sandbox.faults("twilio", outage=True)
    sandbox.faults("vonage", outage=True)
    messages = campaign(make_message, 4)
    before = timezone.now()
    messages_dispatch(message_ids=ids(messages))
    for message in Message.objects.filter(pk__in=ids(messages)):
        assert message.state == "accepted" and message.failed_rounds == 1
        assert message.lease_expires_at is None and message.next_attempt_at >= before
        # bulk policy: the first retry waits up to 60 s (full jitter), within the deadline
        assert message.next_attempt_at <= timezone.now() + timedelta(seconds=60)


def test_a_permanent_refusal_fails_that_message_only(sandbox, make_message):
    good = campaign(make_message, 3)
    bad = make_message(priority="bulk", to="+1234")  # the provider refuses it with 21211
    messages_dispatch(message_ids=ids(good + [bad]))
    bad.refresh_from_db()
    assert bad.state == "failed" and bad.last_error_code == "21211"
    assert DeadLetter.objects.filter(message=bad).exists()
    assert Message.objects.filter(pk__in=ids(good), state="dispatched").count() == 3


def test_a_timeout_after_the_request_left_is_never_resent_blindly(sandbox, make_message):
    sandbox.faults("twilio", timeout_rate=1.0, timeout_hold_ms=4000)
    messages = campaign(make_message, 3)
    messages_dispatch(message_ids=ids(messages))
    for message in Message.objects.filter(pk__in=ids(messages)):
        assert message.state == "accepted" and message.needs_provider_lookup
        assert hops(message) == [("twilio", "ambiguous")]  # not moved on to vonage
    assert sandbox.requests(provider="vonage") == []


def test_a_bug_in_one_send_leaves_that_message_to_be_looked_up_and_the_rest_go(sandbox, make_message, monkeypatch):
    messages = campaign(make_message, 5)
    broken = str(messages[2].pk)
    real_send = TwilioProvider.send_async

    async def send(self, request):
        if request.message_id == broken:
            raise RuntimeError("adapter bug")
        return await real_send(self, request)

    monkeypatch.setattr(TwilioProvider, "send_async", send)
    messages_dispatch(message_ids=ids(messages))
    message = Message.objects.get(pk=broken)
    assert message.state == "accepted" and message.lease_expires_at is None
    assert hops(message) == [("twilio", "in_progress")]  # its next claim looks it up first
    assert Message.objects.filter(pk__in=ids(messages), state="dispatched").count() == 4


def test_a_receipt_that_overtook_the_batch_keeps_its_state_and_gets_the_reference(sandbox, make_message, monkeypatch):
    messages = campaign(make_message, 3)
    overtaken = messages[0]
    real_record = dispatch._record

    def record(calling, released):
        # Its receipt lands between the provider's answer and our write.
        Message.objects.filter(pk=overtaken.pk).update(state="delivered", delivered_at=timezone.now())
        real_record(calling, released)

    monkeypatch.setattr(dispatch, "_record", record)
    messages_dispatch(message_ids=ids(messages))
    overtaken.refresh_from_db()
    assert overtaken.state == "delivered" and overtaken.provider_message_id and overtaken.dispatched_at
    assert overtaken.lease_expires_at is None
    event = MessageEvent.objects.get(message=overtaken, to_state="dispatched")
    assert event.applied is False and event.from_state == "delivered"
    assert Message.objects.filter(pk__in=ids(messages[1:]), state="dispatched").count() == 2


def test_bulk_messages_are_published_as_fair_batch_tasks_naming_their_channel(monkeypatch, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "BULK_BATCH_SIZE": 2}
    sent: list[tuple[str, list, str]] = []
    monkeypatch.setattr(
        "messaging.publish.current_app.send_task",
        lambda name, args, queue, **kwargs: sent.append((name, args, queue)),
    )
    messages = [("a", "sms", "bulk"), ("b", "sms", "bulk"), ("c", "sms", "bulk"), ("d", "email", "bulk")]
    assert messages_publish(messages=[*messages, ("e", "sms", "critical")]) == 4
    # As many tasks as batches of work; which messages each takes is decided when it runs (messaging.fair).
    assert sorted(sent) == sorted(
        [
            ("messaging.dispatch", ["e"], "sms.critical"),
            ("messaging.dispatch_bulk", ["sms"], "sms.bulk"),
            ("messaging.dispatch_bulk", ["sms"], "sms.bulk"),
            ("messaging.dispatch_bulk", ["email"], "email.bulk"),
        ]
    )


def test_without_fair_sharing_bulk_messages_are_published_as_batches_of_ids(monkeypatch, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "BULK_BATCH_SIZE": 2, "BULK_FAIR_SHARING": False}
    sent: list[tuple[str, list, str]] = []
    monkeypatch.setattr(
        "messaging.publish.current_app.send_task",
        lambda name, args, queue, **kwargs: sent.append((name, args[0], queue)),
    )
    published = messages_publish(
        messages=[
            ("a", "sms", "bulk"),
            ("b", "sms", "bulk"),
            ("c", "sms", "bulk"),
            ("d", "email", "bulk"),
            ("e", "sms", "critical"),
        ]
    )
    assert published == 4
    assert sorted(sent) == sorted(
        [
            ("messaging.dispatch", "e", "sms.critical"),
            ("messaging.dispatch_batch", ["a", "b"], "sms.bulk"),
            ("messaging.dispatch_batch", ["c"], "sms.bulk"),
            ("messaging.dispatch_batch", ["d"], "email.bulk"),
        ]
    )


def test_messages_for_a_rate_limited_provider_go_one_slot_at_a_time(sandbox, make_message, handed_back, settings):
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"]["RATE_LIMIT_PER_SECOND"] = 20
    settings.CONDUCTOR_PROVIDERS = providers
    reset_guards()
    messages = campaign(make_message, 5)
    messages_dispatch(message_ids=ids(messages))
    # a round of them at once would arrive bunched: the per-message path waits for each slot
    assert sorted(handed_back) == sorted(ids(messages)) and sandbox.requests() == []
    assert not Message.objects.filter(pk__in=ids(messages), lease_expires_at__isnull=False).exists()


def test_a_call_that_outlives_its_budget_is_ambiguous_before_the_lease_ends(
    sandbox, make_message, monkeypatch, settings, leases
):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "DISPATCH_LEASE_SECONDS": 2.0}

    async def hang(self, request):  # answers nothing, past every socket timeout
        await asyncio.sleep(30)

    monkeypatch.setattr(TwilioProvider, "send_async", hang)
    [message] = campaign(make_message, 1)
    messages_dispatch(message_ids=ids([message]))
    message.refresh_from_db()
    # given up and recorded inside the lease (2 s): nobody else could have claimed it meanwhile
    # (the call's budget ends a quarter of the lease before it)
    [attempt] = DispatchAttempt.objects.filter(message=message)
    assert attempt.ended_at < leases[0]
    assert message.state == "accepted" and message.needs_provider_lookup
    assert hops(message) == [("twilio", "ambiguous")] and message.last_error_type == "provider_timeout"


def test_a_round_of_more_waves_than_its_budget_holds_still_ends_inside_the_lease(
    sandbox, make_message, monkeypatch, settings, leases
):
    # One call at a time, each answering after the round's whole budget: the first is cut off
    # (ambiguous), the ones waiting for their turn are never made (transient, nothing sent), and
    # every attempt ends before the lease does, however many waves the round had.
    settings.CONDUCTOR = {**settings.CONDUCTOR, "DISPATCH_LEASE_SECONDS": 2.0, "BULK_SEND_CONCURRENCY": 1}
    made = []

    async def hang(self, request):
        made.append(request.message_id)
        await asyncio.sleep(30)

    monkeypatch.setattr(TwilioProvider, "send_async", hang)
    messages = campaign(make_message, 3)
    messages_dispatch(message_ids=ids(messages))
    assert len(made) == 1
    attempts = DispatchAttempt.objects.filter(message__in=messages, provider="twilio")
    assert sorted(attempts.values_list("outcome", flat=True)) == ["ambiguous", "transient_error", "transient_error"]
    assert all(a.ended_at < leases[0] for a in attempts)
    for attempt in attempts.filter(outcome="transient_error"):
        assert attempt.error_message.startswith("not sent") and attempt.error_type == "provider_timeout"
    assert Message.objects.filter(pk__in=ids(messages), lease_expires_at__isnull=False).count() == 0
