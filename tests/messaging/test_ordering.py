"""Per-key ordering in-process: gap-free sequences, waiting without a worker, release by the
predecessor's move, dead predecessors (proceed or hold), the stricter delivered mode, the sweeper."""

from __future__ import annotations

import threading
from collections import defaultdict
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.models import Message
from messaging.ordering import ordering_blocker, ordering_wait, sequence_next
from messaging.services import message_cancel, message_create, message_transition
from messaging.sweeper import messages_sweep

pytestmark = pytest.mark.django_db

SMS = {"channel": "sms", "to": "+14155552671", "body": "Your order", "priority": "transactional"}


@pytest.fixture
def published(monkeypatch):
    """Message ids handed to the broker, in order (the broker itself is not needed here)."""
    sent: list[str] = []

    def publish(*, message_id, channel, priority, countdown=None):
        sent.append(str(message_id))
        return True

    # The sweeper publishes through messages_publish, which calls this one for non-bulk messages.
    monkeypatch.setattr("messaging.publish.message_publish", publish)
    monkeypatch.setattr("messaging.ordering.message_publish", publish)
    monkeypatch.setattr("messaging.ingest.message_publish", publish)
    return sent


@pytest.fixture
def single_provider(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {**settings.CONDUCTOR["ROUTES"], "sms": ["twilio"]}}


def create(client, key="order-1", **fields) -> Message:
    return message_create(client=client, fields={**SMS, "ordering_key": key, **fields}, idempotency_key=None).message


def move(message, to_state, **fields):
    assert message_transition(message_id=message.pk, to_state=to_state, source="worker", detail="test", fields=fields)


def test_sequences_count_per_client_and_key_and_unordered_messages_get_none(client_key, other_api):
    client = client_key[0]
    from messaging.models import ApiClient

    other = ApiClient.objects.exclude(pk=client.pk).get()
    assert [create(client).sequence for _ in range(3)] == [1, 2, 3]
    assert create(client, key="order-2").sequence == 1
    assert create(other).sequence == 1
    plain = message_create(client=client, fields=SMS, idempotency_key=None).message
    assert plain.sequence is None and plain.ordering_mode == ""


def test_a_rolled_back_request_gives_its_number_back(client_key):
    client = client_key[0]
    create(client)
    with pytest.raises(RuntimeError), transaction.atomic():
        assert sequence_next(client_id=client.pk, key="order-1") == 2
        raise RuntimeError("the request failed after taking a number")
    assert create(client).sequence == 2


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_for_one_key_get_gap_free_sequences(client_key):
    client = client_key[0]
    sequences: dict[str, list[int]] = defaultdict(list)
    errors: list[BaseException] = []

    def post(thread: int) -> None:
        try:
            for _ in range(10):
                message = create(client, key=f"key-{thread % 2}")
                sequences[message.ordering_key].append(message.sequence)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(sequences["key-0"]) == list(range(1, 41)) and sorted(sequences["key-1"]) == list(range(1, 41))
    # In the order they were accepted, too.
    for key in ("key-0", "key-1"):
        by_time = Message.objects.filter(ordering_key=key).order_by("created_at", "sequence")
        assert [m.sequence for m in by_time] == list(range(1, 41))


def test_a_later_message_waits_without_a_worker_and_is_released_when_the_earlier_one_moves(
    client_key, sandbox, single_provider, published, django_capture_on_commit_callbacks
):
    client = client_key[0]
    first, second, third = create(client), create(client), create(client)
    messages_dispatch(message_ids=[str(second.pk)])
    second.refresh_from_db()
    assert second.state == "accepted" and second.waiting_for_id == first.pk and second.waiting_since
    assert second.lease_expires_at is None and not second.attempts.exists()
    assert sandbox.requests() == []
    messages_dispatch(message_ids=[str(third.pk)])
    third.refresh_from_db()
    assert third.waiting_for_id == second.pk  # the closest earlier one

    with django_capture_on_commit_callbacks(execute=True):
        messages_dispatch(message_ids=[str(first.pk)])
    assert Message.objects.get(pk=first.pk).state == "dispatched"
    assert published == [str(second.pk)]  # released: only the one waiting for it
    with django_capture_on_commit_callbacks(execute=True):
        messages_dispatch(message_ids=[str(second.pk)])
    second.refresh_from_db()
    assert second.state == "dispatched" and second.waiting_for_id is None
    assert published[-1] == str(third.pk)
    messages_dispatch(message_ids=[str(third.pk)])
    assert [r["message_id"] for r in sandbox.requests()] == [str(first.pk), str(second.pk), str(third.pk)]


def test_a_cancelled_or_expired_earlier_message_no_longer_holds_the_key(client_key):
    client = client_key[0]
    first, second, third = create(client), create(client), create(client)
    assert ordering_blocker(third).pk == second.pk
    message_cancel(message=second)
    assert ordering_blocker(third).pk == first.pk  # the cancelled one skipped, the earlier one still holds
    move(first, "expired")
    assert ordering_blocker(third) is None


def test_a_dead_earlier_message_lets_the_later_ones_proceed_by_default(client_key):
    client = client_key[0]
    first, second = create(client), create(client)
    move(first, "dead_lettered")
    assert ordering_blocker(second) is None


def test_with_hold_a_dead_earlier_message_holds_until_replayed_and_dispatched_or_closed(client_key, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ORDERING_DEAD_PREDECESSOR": "hold"}
    client = client_key[0]
    first, second = create(client), create(client)
    move(first, "dead_lettered")
    assert ordering_blocker(second).pk == first.pk
    move(first, "accepted")  # replayed
    assert ordering_blocker(second).pk == first.pk
    move(first, "dispatched")
    assert ordering_blocker(second) is None
    move(second, "dispatched")

    third, fourth = create(client), create(client)
    move(third, "failed")
    assert ordering_blocker(fourth).pk == third.pk
    message_cancel(message=third)  # never dispatched: an operator closes it
    assert Message.objects.get(pk=third.pk).state == "cancelled" and ordering_blocker(fourth) is None


def test_a_message_failed_after_dispatch_cannot_be_cancelled(client_key):
    from messaging.services import NotCancellable

    message = create(client_key[0])
    move(message, "dispatched")
    move(message, "failed")
    with pytest.raises(NotCancellable):
        message_cancel(message=message)


def test_in_delivered_mode_a_message_waits_for_the_receipt_or_the_timeout(client_key, settings, published):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "CATEGORY_ORDERING": {"order_updates": "delivered"}}
    client = client_key[0]
    first = create(client, category="order_updates")
    second = create(client, category="order_updates")
    loose = create(client, category="other")  # its own mode is the default: dispatched is enough
    assert (first.ordering_mode, loose.ordering_mode) == ("delivered", "dispatched")
    move(first, "dispatched")
    assert ordering_blocker(second).pk == first.pk
    assert ordering_wait(second)
    second.refresh_from_db()
    first.refresh_from_db()
    timeout = settings.CONDUCTOR.get("ORDERING_RECEIPT_TIMEOUT_SECONDS", 300.0)
    assert second.next_attempt_at == min(first.dispatched_at + timedelta(seconds=timeout), second.expires_at)
    move(first, "delivered")
    assert ordering_blocker(second) is None
    assert ordering_blocker(loose) is not None  # second still accepted holds it
    # No receipt at all: after the timeout it goes on.
    third, fourth = create(client, ordering_mode="delivered"), create(client, ordering_mode="delivered")
    Message.objects.filter(pk__in=[second.pk, loose.pk]).update(state="dispatched", dispatched_at=timezone.now())
    move(third, "dispatched")
    assert ordering_blocker(fourth).pk == third.pk
    later = timezone.now() + timedelta(seconds=timeout + 1)
    assert ordering_blocker(fourth, now=later) is None


def test_the_sweeper_republishes_a_waiter_only_once_its_blocker_has_moved(client_key, published, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SWEEP_STALE_AFTER_SECONDS": {"transactional": 0.0}}
    client = client_key[0]
    first, second = create(client), create(client)
    Message.objects.filter(pk=first.pk).update(enqueued_at=timezone.now())  # its task is queued
    assert ordering_wait(second)
    Message.objects.filter(pk=second.pk).update(enqueued_at=timezone.now() - timedelta(minutes=5))
    published.clear()
    messages_sweep(now=timezone.now() + timedelta(seconds=1))
    assert str(second.pk) not in published  # first is still accepted: no point waking second
    assert str(first.pk) in published  # (the sweep did run: first's own task was stale)
    # first moved but its release was lost (say, its worker died right after the commit)
    Message.objects.filter(pk=first.pk).update(state="dispatched", dispatched_at=timezone.now())
    messages_sweep(now=timezone.now() + timedelta(seconds=1))
    assert str(second.pk) in published


def test_the_api_shows_sequence_and_what_a_message_waits_for(api, client_key, single_provider, sandbox):
    first = api.post("/api/v1/messages/", {**SMS, "ordering_key": "k"}, format="json").json()
    second = api.post("/api/v1/messages/", {**SMS, "ordering_key": "k", "ordering_mode": "delivered"}, format="json")
    assert second.status_code == 201, second.json()
    second = second.json()
    assert (first["sequence"], second["sequence"], second["ordering_mode"]) == (1, 2, "delivered")
    messages_dispatch(message_ids=[second["id"]])
    shown = api.get(f"/api/v1/messages/{second['id']}/").json()
    assert shown["waiting_for"] == first["id"] and shown["waiting_since"]
    plain = api.post("/api/v1/messages/", SMS, format="json").json()
    assert plain["sequence"] is None and plain["waiting_for"] is None


def test_an_ordering_mode_without_a_key_is_refused_naming_the_field(api):
    response = api.post("/api/v1/messages/", {**SMS, "ordering_mode": "delivered"}, format="json")
    assert response.status_code == 400 and "ordering_mode" in response.json()
    response = api.post("/api/v1/messages/", {**SMS, "ordering_key": "k", "ordering_mode": "soon"}, format="json")
    assert response.status_code == 400 and "ordering_mode" in response.json()


def test_a_message_accepted_behind_a_waiting_one_is_stored_waiting_and_not_published(
    client_key, published, django_capture_on_commit_callbacks
):
    client = client_key[0]
    with django_capture_on_commit_callbacks(execute=True):
        first, second = create(client), create(client)
    assert published == [str(first.pk)]  # no task for second: first's move will publish it
    second.refresh_from_db()
    assert second.waiting_for_id == first.pk and second.waiting_since
    with django_capture_on_commit_callbacks(execute=True):
        move(first, "dispatched")
        third = create(client)  # second is still ahead of it
    assert published == [str(first.pk), str(second.pk)] and Message.objects.get(pk=third.pk).waiting_for_id == second.pk
