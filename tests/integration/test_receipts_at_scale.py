"""Receipts at campaign scale through the real stack: every callback the sandbox posts (as Twilio
does: `sent`, then `delivered`) is stored and applied, none given up; a receipts worker killed
mid-batch loses none (its batch rolls back, the sweeper hands the receipts to the next worker)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from django.conf import settings
from django.db import connection, transaction

from messaging.models import Message, MessageEvent, Receipt
from messaging.services import api_key_create
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def key(live):
    return api_key_create(client_name="campaigner")[1]


def campaign(count: int, start: int = 0) -> list[dict]:
    return [
        {
            "channel": "sms",
            "to": f"+1415{5550000 + start + i:07d}",
            "body": f"Sale ends tonight ({i})",
            "priority": "bulk",
        }
        for i in range(count)
    ]


def post_campaign(live, key, items: list[dict]) -> list[str]:
    ids = []
    session = live.api(key)
    for offset in range(0, len(items), 1000):
        response = session.post(
            f"{live.web_url}/api/v1/messages/batch/", json={"messages": items[offset : offset + 1000]}, timeout=120
        )
        assert response.status_code == 200, response.text[:500]
        ids += [r["message"]["id"] for r in response.json()["results"]]
    return ids


def states(ids) -> Counter:
    return Counter(Message.objects.filter(pk__in=ids).values_list("state", flat=True))


def receipts_settled(live) -> bool:
    summary = live.sandbox_callback_summary()["total"]
    return summary["pending"] == 0 and not Receipt.objects.filter(processed_at__isnull=True).exists()


def test_a_5000_message_campaign_ends_delivered_with_every_receipt_stored_and_applied(live, key):
    ids = post_campaign(live, key, campaign(5000))
    wait_until(lambda: states(ids)["delivered"] == len(ids), 240, interval=1, what="5,000 messages delivered")
    wait_until(lambda: receipts_settled(live), 60, interval=0.5, what="callbacks posted and receipts applied")
    summary = live.sandbox_callback_summary()["total"]
    stored = Receipt.objects.filter(source="webhook").count()
    processed = Receipt.objects.filter(source="webhook", processed_at__isnull=False).count()
    print(f"5,000 SMS: callbacks {summary}; receipts stored {stored}, applied {processed}")
    assert summary["given_up"] == 0
    assert summary["posted_ok"] >= 2 * len(ids), "the sandbox did not call back per status change"
    assert summary["posted_ok"] == stored == processed
    assert not Receipt.objects.exclude(unmatched_reason="").exists()
    # Each message entered delivered exactly once, however its two receipts were batched.
    delivered_events = Counter(
        MessageEvent.objects.filter(message_id__in=ids, to_state="delivered", applied=True).values_list(
            "message_id", flat=True
        )
    )
    assert len(delivered_events) == len(ids) and set(delivered_events.values()) == {1}


def _receipts_being_applied() -> bool:
    """Whether an applier holds pending receipts right now: some are locked by its open batch."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM messaging_receipt WHERE processed_at IS NULL")
        pending = cursor.fetchone()[0]
        cursor.execute(
            "SELECT count(*) FROM (SELECT id FROM messaging_receipt WHERE processed_at IS NULL "
            "FOR KEY SHARE SKIP LOCKED) AS free"
        )
        free = cursor.fetchone()[0]
    return free < pending


def test_a_receipts_worker_killed_mid_batch_loses_no_receipt(live, key):
    every_queue = [queue.name for queue in settings.CELERY_TASK_QUEUES]
    # Senders on every queue but `receipts`: the receipts pile up stored and pending.
    for worker in list(live.workers):
        live.kill_worker(worker)
    live.start_worker(queues=",".join(name for name in every_queue if name != "receipts"))
    ids = post_campaign(live, key, campaign(3000, start=100_000))
    wait_until(lambda: states(ids)["dispatched"] == len(ids), 180, interval=1, what="3,000 dispatched")
    wait_until(
        lambda: live.sandbox_callback_summary()["total"]["pending"] == 0, 60, interval=0.5, what="callbacks posted"
    )
    stored = Receipt.objects.count()
    assert stored == live.sandbox_callback_summary()["total"]["posted_ok"] >= 6000
    assert not Receipt.objects.filter(processed_at__isnull=False).exists()

    # A receipts worker starts on the pile and is SIGKILLed while a batch is open.
    applier = live.start_worker(concurrency=1, queues="receipts")
    wait_until(_receipts_being_applied, 60, interval=0.01, what="a batch under way")
    live.kill_worker(applier)
    applied_at_kill = Receipt.objects.filter(processed_at__isnull=False).count()
    assert applied_at_kill < stored, "the kill came after the last batch"
    time.sleep(3)
    # Its open batch rolled back, and with nobody consuming `receipts` nothing moves.
    assert Receipt.objects.filter(processed_at__isnull=False).count() == applied_at_kill
    assert not _receipts_being_applied()

    # The next receipts worker gets them: the sweeper publishes the applier for what waits.
    live.start_worker(concurrency=1, queues="receipts")
    wait_until(
        lambda: not Receipt.objects.filter(processed_at__isnull=True).exists(), 120, interval=0.5, what="all applied"
    )
    assert states(ids) == {"delivered": len(ids)}
    assert Receipt.objects.filter(processed_at__isnull=False).count() == stored
    delivered_events = Counter(
        MessageEvent.objects.filter(message_id__in=ids, to_state="delivered", applied=True).values_list(
            "message_id", flat=True
        )
    )
    assert set(delivered_events.values()) == {1} and len(delivered_events) == len(ids)
    print(f"killed at {applied_at_kill} of {stored} receipts applied; the rest applied after")
    live.replace_workers()  # the next test gets the default worker back
