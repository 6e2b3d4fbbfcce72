"""The fair bulk claim (messaging.fair): an equal share per client, each client's oldest first,
only plain due unleased bulk messages, locked rows skipped; and the sweeper's part in it."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from messaging.fair import bulk_pick_fair
from messaging.models import ApiClient, Message
from messaging.sweeper import messages_sweep

pytestmark = pytest.mark.django_db(transaction=True)


def campaign(client: ApiClient, count: int, channel: str = "sms", start=None, **fields) -> list[Message]:
    start = start or timezone.now()
    rows = [
        Message(
            **{
                "id": uuid.uuid4(),
                "client": client,
                "channel": channel,
                "to": f"+1415555{i:04d}" if channel == "sms" else f"u{i}@example.com",
                "body": "20% off",
                "priority": "bulk",
                "expires_at": start + timedelta(hours=1),
                "created_at": start + timedelta(microseconds=i),
                "accepted_at": start,
                "enqueued_at": start,
                **fields,
            }
        )
        for i in range(count)
    ]
    return Message.objects.bulk_create(rows)


def pick(channel="sms", size=100):
    with transaction.atomic():
        return bulk_pick_fair(channel=channel, size=size, now=timezone.now())


@pytest.fixture
def clients(db):
    return [ApiClient.objects.create(name=name) for name in ("big", "small", "third")]


def test_a_small_client_gets_its_share_of_the_next_batch_not_the_end_of_the_queue(clients):
    big, small, _ = clients
    early = timezone.now() - timedelta(minutes=1)
    big_rows = campaign(big, 1000, start=early)  # queued first
    small_rows = campaign(small, 10)
    picked = set(pick(size=100))
    assert {m.pk for m in small_rows} <= picked  # all ten in the very next batch
    # The rest of the batch is the big client's oldest, in order.
    assert picked - {m.pk for m in small_rows} == {m.pk for m in big_rows[:90]}


def test_shares_are_equal_while_every_client_has_work(clients):
    big, small, third = clients
    for client in clients:
        campaign(client, 200)
    picked = pick(size=99)
    per_client = Message.objects.filter(pk__in=picked).values_list("client__name", flat=True)
    assert sorted(per_client) == sorted(["big"] * 33 + ["small"] * 33 + ["third"] * 33)


def test_only_plain_due_unleased_bulk_messages_of_the_channel_are_picked(clients):
    client = clients[0]
    now = timezone.now()
    [plain] = campaign(client, 1)
    excluded = [
        *campaign(client, 1, lease_expires_at=now + timedelta(seconds=30)),
        *campaign(client, 1, next_attempt_at=now + timedelta(minutes=1)),
        *campaign(client, 1, needs_provider_lookup=True),
        *campaign(client, 1, sequence=1, ordering_key="k"),
        *campaign(client, 1, expires_at=now - timedelta(seconds=1)),
        *campaign(client, 1, worker_loss_count=99),
        *campaign(client, 1, state="dispatched"),
        *campaign(client, 1, channel="email"),
        *campaign(client, 1),
    ]
    Message.objects.filter(pk=excluded[-1].pk).update(priority="transactional")
    assert pick() == [plain.pk]


def test_concurrent_claimers_skip_each_others_rows_instead_of_waiting(clients, other_session):
    rows = campaign(clients[0], 20)
    held = other_session(autocommit=False)
    with held.cursor() as cursor:  # another claimer holds the oldest five
        cursor.execute("SELECT id FROM messaging_message WHERE id = ANY(%s) FOR UPDATE", [[m.pk for m in rows[:5]]])
    assert pick(size=10) == [m.pk for m in rows[5:15]]
    held.rollback()


def test_the_sweeper_gives_messages_a_fair_batch_would_not_take_a_task_of_their_own(clients, monkeypatch):
    sent: list[tuple[str, list]] = []
    monkeypatch.setattr(
        "messaging.publish.current_app.send_task", lambda name, args, queue, **kwargs: sent.append((name, args))
    )
    client = clients[0]
    [plain] = campaign(client, 1, enqueued_at=None)
    [lookup] = campaign(client, 1, enqueued_at=None, needs_provider_lookup=True)
    assert messages_sweep().enqueued == 2
    assert sorted(sent) == [("messaging.dispatch", [str(lookup.pk)]), ("messaging.dispatch_bulk", ["sms"])]
    assert plain.pk
