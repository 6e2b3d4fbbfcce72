"""End to end through real processes: API (gunicorn) -> PostgreSQL -> Redis -> Celery worker ->
official Twilio SDK -> sandbox over HTTP -> signed status callback -> webhook. No mocks."""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from urllib.parse import urlencode

import pytest
import requests
from django.conf import settings
from django.db import connection
from django.utils import timezone
from twilio.request_validator import RequestValidator

from messaging.models import ApiClient, AttemptOutcome, DispatchAttempt, Message
from messaging.services import api_key_create
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SMS = {"channel": "sms", "to": "+14155552671", "body": "Your code is 123456"}


@pytest.fixture
def key(live):
    return api_key_create(client_name="acme")[1]


def states(ids) -> Counter:
    return Counter(Message.objects.filter(pk__in=ids).values_list("state", flat=True))


def wait_for_all(ids, allowed: set[str], timeout: float) -> Counter:
    wait_until(
        lambda: sum(states(ids)[s] for s in allowed) == len(ids),
        timeout,
        interval=0.25,
        what=f"{len(ids)} messages in {allowed}",
    )
    return states(ids)


def accepted_sends_per_message(stack) -> Counter:
    """How often each message was accepted by any provider: more than once is a duplicate."""
    return Counter(r["message_id"] for r in stack.sandbox_requests(accepted="true"))


def post_batch(stack, key, items) -> list[str]:
    response = stack.api(key).post(f"{stack.web_url}/api/v1/messages/batch/", json={"messages": items}, timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert all(r["status"] == 201 for r in results), results[:3]
    return [r["message"]["id"] for r in results]


def test_a_message_reaches_delivered_through_the_real_stack(live, key):
    response = live.api(key).post(f"{live.web_url}/api/v1/messages/", json=SMS, timeout=10)
    assert response.status_code == 201, response.text
    message_id = response.json()["id"]
    wait_for_all([message_id], {"delivered"}, timeout=30)

    detail = live.api(key).get(f"{live.web_url}/api/v1/messages/{message_id}/", timeout=10).json()
    assert [e["to_state"] for e in detail["events"] if e["applied"]] == ["accepted", "dispatched", "delivered"]
    assert [a["outcome"] for a in detail["attempts"]] == ["accepted"]
    assert detail["provider"] == "twilio" and detail["provider_message_id"].startswith("SM")
    assert detail["dispatched_at"] and detail["delivered_at"]
    # Twilio's status callbacks: `sent` (which moves nothing past dispatched), then `delivered`.
    assert [r["provider_status"] for r in detail["receipts"]] == ["sent", "delivered"]
    sends = live.sandbox_requests(message_id=message_id)
    assert len(sends) == 1 and sends[0]["accepted"] and sends[0]["token"] == f"{message_id}.1"
    assert sends[0]["to"] == SMS["to"] and sends[0]["body"] == SMS["body"]


def test_twenty_concurrent_posts_with_one_key_create_exactly_one_message(live, key):
    session_headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "order-42-confirmation"}

    def post(_):
        return requests.post(f"{live.web_url}/api/v1/messages/", json=SMS, headers=session_headers, timeout=30)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(post, range(20)))
    codes = Counter(r.status_code for r in responses)
    assert codes[201] == 1, codes
    assert codes[200] + codes[409] == 19, codes
    assert all(r.headers.get("Idempotent-Replayed") == "true" for r in responses if r.status_code == 200)
    assert len({r.json()["id"] for r in responses if r.status_code in (200, 201)}) == 1
    assert Message.objects.count() == 1
    different = requests.post(
        f"{live.web_url}/api/v1/messages/", json={**SMS, "body": "other"}, headers=session_headers, timeout=10
    )
    assert different.status_code == 422


def test_with_30_percent_provider_errors_every_message_is_delivered_once(live, key):
    live.sandbox_faults(error_rate=0.3, latency_ms=20)
    items = [{**SMS, "to": f"+1415555{2000 + i:04d}", "category": "fast_retry"} for i in range(200)]
    ids = post_batch(live, key, items)
    final = wait_for_all(ids, {"delivered"}, timeout=180)
    assert final == {"delivered": 200}
    per_message = accepted_sends_per_message(live)
    assert set(per_message) == set(ids)
    assert max(per_message.values()) == 1, "a message was accepted twice by the provider"
    refused = [r for r in live.sandbox_requests(accepted="false") if r["fault"] == "error"]
    assert refused, "the fault was not injected"
    retried = DispatchAttempt.objects.filter(outcome=AttemptOutcome.TRANSIENT_ERROR, error_type="provider_5xx").count()
    assert retried == len(refused)


def test_in_a_full_outage_critical_messages_end_dead_lettered_never_stuck(live, key):
    live.sandbox_faults("twilio", outage=True)
    live.sandbox_faults("vonage", outage=True)
    # Once both circuits open, rounds that reach no provider spend no retry budget: the deadline
    # (20 s here) is what ends those messages.
    items = [{**SMS, "to": f"+1415555{3000 + i:04d}", "priority": "critical", "ttl_seconds": 20} for i in range(10)]
    ids = post_batch(live, key, items)
    final = wait_for_all(ids, {"dead_lettered", "expired"}, timeout=60)
    assert final["dead_lettered"] + final["expired"] == 10
    for message in Message.objects.filter(pk__in=ids):
        assert message.failed_rounds <= 6
        if message.state == "dead_lettered":
            # six rounds through the route; the circuits may open on the way (skips cost nothing)
            assert message.failed_rounds == 6 and message.last_error_type in ("provider_5xx", "circuit_open")
    assert accepted_sends_per_message(live) == Counter()


def test_a_deadline_that_passes_during_an_outage_expires_the_message_unsent(live, key):
    live.sandbox_faults("twilio", outage=True)
    live.sandbox_faults("vonage", outage=True)
    response = live.api(key).post(
        f"{live.web_url}/api/v1/messages/", json={**SMS, "ttl_seconds": 3, "priority": "transactional"}, timeout=10
    )
    message_id = response.json()["id"]
    wait_for_all([message_id], {"expired"}, timeout=30)
    message = Message.objects.get(pk=message_id)
    assert message.expired_at >= message.expires_at
    live.sandbox_faults("twilio", outage=False)
    live.sandbox_faults("vonage", outage=False)
    time.sleep(2)  # a retry scheduled before the deadline must not send it now
    assert accepted_sends_per_message(live) == Counter()


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(live, key):
    live.sandbox_faults(latency_ms=150, latency_max_ms=400)
    items = [{**SMS, "to": f"+1415555{4000 + i:04d}", "category": "fast_retry"} for i in range(60)]
    ids = post_batch(live, key, items)
    wait_until(lambda: len(accepted_sends_per_message(live)) >= 8, 30, what="some sends")
    live.kill_worker(live.workers[0])
    left = states(ids)
    assert left["accepted"] > 0, "the kill came too late to test anything"
    live.start_worker()
    final = wait_for_all(ids, {"delivered"}, timeout=120)
    assert final == {"delivered": 60}
    assert max(accepted_sends_per_message(live).values()) == 1, "a message was accepted twice"


def test_an_ambiguous_timeout_is_resolved_by_looking_the_message_up_not_by_resending(live, key):
    # The sandbox accepts the send but answers after the client's 3 s timeout; its receipt is held
    # back so that only the look-up can tell the worker that the provider already has the message
    # (final_only: no early `sent` callback either, which would tell it as well).
    live.sandbox_faults(timeout_rate=1.0, timeout_hold_ms=5000, receipt_delay_ms=60_000, callback_mode="final_only")
    response = live.api(key).post(
        f"{live.web_url}/api/v1/messages/", json={**SMS, "category": "fast_retry"}, timeout=10
    )
    message_id = response.json()["id"]
    wait_until(
        lambda: DispatchAttempt.objects.filter(message_id=message_id, outcome="ambiguous").exists(),
        30,
        what="an ambiguous attempt",
    )
    live.sandbox_faults(timeout_rate=0.0)
    wait_for_all([message_id], {"dispatched"}, timeout=30)
    assert accepted_sends_per_message(live) == Counter({message_id: 1})
    outcomes = list(DispatchAttempt.objects.filter(message_id=message_id).values_list("outcome", flat=True))
    assert outcomes == ["ambiguous", "found_at_provider"]
    sandbox_sid = live.sandbox_requests(message_id=message_id)[0]["provider_message_id"]
    assert Message.objects.get(pk=message_id).provider_message_id == sandbox_sid


def test_a_message_whose_task_never_reached_the_broker_is_swept_and_looked_up_before_sending(live, key):
    # As if the broker was down at commit and the last attempt's outcome was unknown: no task
    # exists, so only the sweeper can find it, and the worker must ask the provider first.
    client = ApiClient.objects.get(name="acme")
    now = timezone.now()
    message = Message.objects.create(
        client=client,
        channel="sms",
        to=SMS["to"],
        body=SMS["body"],
        priority="critical",
        expires_at=now + timedelta(minutes=5),
        created_at=now,
        accepted_at=now,
        enqueued_at=None,
        needs_provider_lookup=True,
    )
    wait_for_all([message.pk], {"delivered"}, timeout=30)
    assert accepted_sends_per_message(live) == Counter({str(message.pk): 1})
    assert list(message.attempts.order_by("number").values_list("outcome", flat=True)) == [
        "not_found_at_provider",
        "accepted",
    ]
    assert any("has no record of it" in worker.log_text() for worker in live.workers)


def test_a_backlog_that_outlasts_the_stale_time_is_not_published_again_while_it_drains(live, key):
    # A transactional task counts as lost 5 s after it was published (test settings); 400 of
    # them at 150 ms a send through one worker of 4 processes take about 15 s to drain. While its
    # worker keeps taking tasks from the queue, the ones behind are queued, not lost.
    live.sandbox_faults("twilio", latency_ms=150)
    items = [{"channel": "sms", "to": f"+1202555{i:04d}", "body": f"Notice {i}"} for i in range(400)]
    started_at = timezone.now()
    ids = post_batch(live, key, items)
    started = time.monotonic()
    wait_for_all(ids, {"dispatched", "delivered"}, timeout=120)
    drained_s = time.monotonic() - started
    republished = sum(
        int(record["message"].split(", ")[1].split()[0])
        for worker in live.workers
        for record in (json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{"))
        if record["message"].startswith("sweep: ") and record["time"] >= started_at.isoformat()
    )
    print(f"\n400 messages drained in {drained_s:.1f} s; {republished} published again by the sweeper")
    assert drained_s > 2 * settings.CONDUCTOR["SWEEP_STALE_AFTER_SECONDS"]["transactional"]
    assert republished <= 20  # by the stale time alone: every queued one, every 5 s (over 600 here)
    assert accepted_sends_per_message(live) == Counter({message_id: 1 for message_id in ids})


def test_workers_keep_their_database_connections_between_tasks(live, key):
    # Celery closes every connection around every task by itself (conductor_project/celery.py);
    # 60 messages and a sweep a second would open a PostgreSQL backend each.
    def sessions() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
            return cursor.fetchone()[0]

    wait_for_all(post_batch(live, key, [SMS]), {"dispatched", "delivered"}, timeout=30)  # connections made
    time.sleep(1.5)  # statistics reach pg_stat_database within a second
    before = sessions()
    ids = post_batch(live, key, [{**SMS, "to": f"+1202555{i:04d}"} for i in range(60)])
    wait_for_all(ids, {"dispatched", "delivered"}, timeout=60)
    time.sleep(1.5)
    opened = sessions() - before
    print(f"\n60 messages, {opened} database sessions opened meanwhile")
    assert opened < 20


def test_forged_status_callbacks_are_refused_and_change_nothing(live, key):
    live.sandbox_faults(receipt_delay_ms=60_000)  # keep the real receipt away
    response = live.api(key).post(f"{live.web_url}/api/v1/messages/", json=SMS, timeout=10)
    message_id = response.json()["id"]
    wait_for_all([message_id], {"dispatched"}, timeout=30)
    sid = Message.objects.get(pk=message_id).provider_message_id
    path = "/webhooks/twilio/?" + urlencode({"message_id": message_id, "token": f"{message_id}.1"})
    params = {"MessageSid": sid, "MessageStatus": "delivered", "AccountSid": "AC0", "To": SMS["to"]}
    url = live.web_url + path
    forged = requests.post(url, data=params, headers={"X-Twilio-Signature": "Zm9yZ2Vk"}, timeout=10)
    unsigned = requests.post(url, data=params, timeout=10)
    wrong_key = RequestValidator("not-the-auth-token").compute_signature(url, params)
    wrong = requests.post(url, data=params, headers={"X-Twilio-Signature": wrong_key}, timeout=10)
    assert (forged.status_code, unsigned.status_code, wrong.status_code) == (403, 403, 403)
    assert Message.objects.get(pk=message_id).state == "dispatched"
    # The same callback signed with the real token is accepted: the check is not refusing everything.
    signature = RequestValidator(settings.CONDUCTOR_PROVIDERS["twilio"]["AUTH_TOKEN"]).compute_signature(url, params)
    genuine = requests.post(url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10)
    assert genuine.status_code == 204
    wait_for_all([message_id], {"delivered"}, timeout=10)  # applied off the request path, in a batch
    # Re-sent callbacks are stored once (the sandbox's own `sent` callback may be there too).
    requests.post(url, data=params, headers={"X-Twilio-Signature": signature}, timeout=10)
    assert Message.objects.get(pk=message_id).receipts.filter(provider_status="delivered").count() == 1


def test_when_half_the_sends_time_out_after_acceptance_all_are_delivered_and_none_twice(live, key):
    live.replace_workers(count=2)
    for provider in ("twilio", "vonage"):  # both SMS providers: fallback cannot dodge the fault
        live.sandbox_faults(provider, timeout_rate=0.5, timeout_hold_ms=3500, latency_ms=10)
    items = [{**SMS, "to": f"+1415555{5000 + i:04d}", "category": "fast_retry"} for i in range(120)]
    ids = post_batch(live, key, items)
    final = wait_for_all(ids, {"delivered"}, timeout=240)
    assert final == {"delivered": 120}
    per_message = accepted_sends_per_message(live)
    assert set(per_message) == set(ids) and max(per_message.values()) == 1, "a message was accepted twice"
    timed_out = [r for r in live.sandbox_requests() if r["fault"] == "timeout"]
    assert len(timed_out) > 30, "the fault was not injected"
    ambiguous = DispatchAttempt.objects.filter(message_id__in=ids, outcome=AttemptOutcome.AMBIGUOUS).count()
    print(
        f"120 messages: {len(timed_out)} sends timed out after acceptance, "
        f"{ambiguous} ambiguous attempts recorded, 0 accepted twice"
    )
