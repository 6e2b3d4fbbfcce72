"""Issue 21 on the whole stack: every state change of every message reaches a faulty client
endpoint, signed, de-duplicable and in order; a worker SIGKILLed mid-delivery and a Redis restart
lose no callback."""

from __future__ import annotations

import time
from collections import Counter, defaultdict

import pytest

from messaging.models import Callback, CallbackState, MessageEvent
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import post_batch, states
from tests.support.callback_receiver import ReceiverProcess
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _register(live, key: str, receiver: ReceiverProcess) -> str:
    """The client's endpoint for every event, at the receiver; returns its secret."""
    response = live.api(key).post(
        f"{live.web_url}/api/v1/callback-endpoints/", json={"url": receiver.url()}, timeout=10
    )
    assert response.status_code == 201, response.text
    return response.json()["secret"]


def _expected(ids: list[str]) -> dict[str, list[str]]:
    """Per message, the state changes it went through, in order (the events of applied transitions)."""
    changes: dict[str, list[str]] = defaultdict(list)
    for message_id, to_state in (
        MessageEvent.objects.filter(message_id__in=ids, applied=True)
        .order_by("id")
        .values_list("message_id", "to_state")
    ):
        changes[str(message_id)].append(to_state)
    return changes


def _first_arrivals(records: list[dict]) -> dict[str, list[dict]]:
    """The receiver's de-duplicated stream: the first arrival of each webhook-id, per message in
    arrival order."""
    seen: set[str] = set()
    stream: dict[str, list[dict]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r["at"]):
        if record["webhook_id"] in seen:
            continue
        seen.add(record["webhook_id"])
        stream[record["body"]["data"]["message_id"]].append(record["body"]["data"])
    return stream


def _assert_exactly_once_in_order(ids: list[str], records: list[dict]) -> None:
    expected = _expected(ids)
    stream = _first_arrivals(records)
    assert set(stream) == set(expected), f"{len(set(expected) - set(stream))} message(s) never reported"
    for message_id, changes in expected.items():
        got = stream[message_id]
        assert [d["event"] for d in got] == changes, (message_id, got)
        sequences = [d["sequence"] for d in got]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences), (message_id, sequences)
    assert all(r["verified"] for r in records), [r for r in records if not r["verified"]][:3]
    # At least once: every webhook-id was answered 2xx at some point.
    answered = {r["webhook_id"] for r in records if isinstance(r["answer"], int) and 200 <= r["answer"] < 300}
    assert answered == {r["webhook_id"] for r in records}


def _diagnose(ids: list[str], receiver: ReceiverProcess) -> None:
    from django.db.models import Count, Max, Min
    from django.utils import timezone

    pending = Callback.objects.filter(message_id__in=ids).exclude(state=CallbackState.DELIVERED)
    print("\nnot delivered:", pending.values("state").annotate(n=Count("id")), "now", timezone.now())
    print(pending.aggregate(Min("next_attempt_at"), Max("next_attempt_at"), Max("attempts"), Min("lease_expires_at")))
    for row in pending.order_by("next_attempt_at")[:5].values(
        "id", "sequence", "attempts", "attempt_log", "lease_expires_at"
    ):
        print(row)
    print(receiver.summary())


def _all_delivered(ids: list[str]) -> bool:
    return not Callback.objects.filter(message_id__in=ids).exclude(state=CallbackState.DELIVERED).exists()


def test_every_change_of_2000_messages_reaches_an_endpoint_with_errors_timeouts_and_an_outage(live):
    key = api_key_create(client_name="acme")[1]
    receiver = ReceiverProcess(secrets=[])
    try:
        receiver.secrets = [_register(live, key, receiver)]
        # 30 % answered 500, 10 % held past the sender's timeout (1 s in the test settings).
        receiver.start()
        receiver.faults(error_rate=0.3, timeout_rate=0.1, hold_seconds=2.0)
        items = [{"channel": "sms", "to": f"+1202555{i:04d}", "body": f"Notice {i}"} for i in range(2000)]
        started = time.monotonic()
        ids = post_batch(live, key, items[:1000])
        wait_until(lambda: receiver.summary()["requests"] > 500, 120, interval=0.2, what="callbacks flowing")
        print(f"\nflowing after {time.monotonic() - started:.0f} s: {receiver.summary()}")
        receiver.outage(60, "refuse")  # connections refused for a minute, mid-run
        outage_began = time.time()
        ids += post_batch(live, key, items[1000:])
        wait_until(lambda: states(ids)["delivered"] == 2000, 300, interval=1, what="every message delivered")
        try:
            wait_until(lambda: _all_delivered(ids), 420, interval=1, what="every callback delivered")
        except TimeoutError:
            _diagnose(ids, receiver)
            raise
        elapsed = time.monotonic() - started
        records = receiver.records()
    finally:
        receiver.stop()
    answers = Counter(str(r["answer"]) for r in records)
    during_outage = [r for r in records if outage_began + 1 < r["at"] < outage_began + 59]
    distinct = len({r["webhook_id"] for r in records})
    print(f"\n2,000 messages, {distinct:,} callbacks in {len(records):,} requests ({dict(answers)}) in {elapsed:.0f} s")
    assert not Callback.objects.filter(message_id__in=ids, state=CallbackState.DEAD_LETTERED).exists()
    assert distinct == Callback.objects.filter(message_id__in=ids).count() == 6000  # accepted, dispatched, delivered
    # The faults were there: errors, held requests, retries under the same webhook-id, and a
    # minute in which nothing got through.
    assert answers["500"] > 0.2 * distinct and answers["held"] > 0.05 * distinct
    assert len(records) > 1.3 * distinct
    assert during_outage == []
    _assert_exactly_once_in_order(ids, records)


def test_a_worker_sigkilled_mid_delivery_and_a_redis_restart_lose_no_callback(live):
    key = api_key_create(client_name="acme")[1]
    receiver = ReceiverProcess(secrets=[])
    try:
        receiver.secrets = [_register(live, key, receiver)]
        receiver.start()
        receiver.faults(latency_ms=400)  # every request is in flight for a while: the kill lands mid-request
        items = [{"channel": "sms", "to": f"+1202556{i:04d}", "body": f"Notice {i}"} for i in range(300)]
        ids = post_batch(live, key, items)
        wait_until(lambda: receiver.summary()["requests"] > 100, 60, interval=0.1, what="callbacks flowing")
        in_flight = Callback.objects.filter(
            message_id__in=ids, state=CallbackState.PENDING, lease_expires_at__isnull=False
        ).count()
        [worker] = live.workers
        live.kill_worker(worker)  # SIGKILL
        live.restart_redis()  # empties the broker and the deliverer's running flag
        assert not worker.alive()
        delivered_at_kill = Callback.objects.filter(message_id__in=ids, state=CallbackState.DELIVERED).count()
        live.start_worker()
        wait_until(lambda: states(ids)["delivered"] == 300, 180, interval=1, what="every message delivered")
        wait_until(lambda: _all_delivered(ids), 180, interval=1, what="every callback delivered")
        records = receiver.records()
    finally:
        receiver.stop()
    print(f"\nkilled with {in_flight} callbacks leased, {delivered_at_kill} of 900 delivered; {len(records)} requests")
    assert in_flight > 0  # the kill landed mid-delivery
    assert delivered_at_kill < 900
    assert Callback.objects.filter(message_id__in=ids).count() == 900
    _assert_exactly_once_in_order(ids, records)
