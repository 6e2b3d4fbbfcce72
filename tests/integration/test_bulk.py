"""Bulk campaigns through the real stack: batch API -> dispatch_bulk tasks -> concurrent sends ->
receipts, with provider faults and a worker killed mid-batch. Nothing lost, nothing doubled."""

from __future__ import annotations

import pytest

from messaging.models import UNKNOWN_OUTCOMES, AttemptOutcome, DispatchAttempt
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import SMS, accepted_sends_per_message, post_batch, states, wait_for_all
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def key(live):
    return api_key_create(client_name="acme")[1]


def campaign(count: int, start: int) -> list[dict]:
    # fast_retry: the bulk policy's first retry waits up to a minute; this category's, 2 s.
    return [
        {**SMS, "to": f"+1415556{start + i:04d}", "priority": "bulk", "category": "fast_retry"} for i in range(count)
    ]


def test_a_campaign_with_errors_and_timeouts_is_delivered_once_each_in_batches(live, key):
    live.sandbox_faults(error_rate=0.2, timeout_rate=0.05, timeout_hold_ms=3500, latency_ms=20)
    ids = post_batch(live, key, campaign(200, 0))
    final = wait_for_all(ids, {"delivered"}, timeout=180)
    assert final == {"delivered": 200}
    per_message = accepted_sends_per_message(live)
    assert set(per_message) == set(ids) and max(per_message.values()) == 1, "a message was accepted twice"
    faults = [r["fault"] for r in live.sandbox_requests(provider="twilio")]
    assert faults.count("error") > 10 and faults.count("timeout") > 2, "the faults were not injected"
    # Each timed-out send left an unknown outcome (ambiguous; or in progress, then closed as lost
    # if the call outlived the batch) that was looked up: no resend ever went out blindly.
    unknown = DispatchAttempt.objects.filter(message_id__in=ids, outcome__in=UNKNOWN_OUTCOMES).count()
    assert unknown >= faults.count("timeout")
    log = "\n".join(worker.log_text() for worker in live.workers)
    assert '"task_name": "messaging.dispatch_bulk"' in log  # sent by the (fair) bulk path, not one task each


def test_a_worker_killed_mid_batch_loses_nothing_and_doubles_nothing(live, key):
    # Receipts come late, so the calls the kill cut off are settled by the next claim, which
    # finds their attempts in progress and looks each one up before any resend.
    live.sandbox_faults(latency_ms=300, latency_max_ms=900, receipt_delay_ms=20_000)
    # More than the worker's 4 processes take at once (4 batches of 250, set here: at the default
    # 500 it would take 2,400 and as many look-ups): some must still be queued when the kill comes.
    batches_of_250 = {"CONDUCTOR_BULK_BATCH_SIZE": "250"}
    live.replace_workers(env=batches_of_250)
    ids = post_batch(live, key, campaign(600, 1000)) + post_batch(live, key, campaign(600, 1600))
    wait_until(lambda: len(accepted_sends_per_message(live)) >= 20, 60, what="some sends")
    live.kill_worker(live.workers[0])
    in_flight = DispatchAttempt.objects.filter(message_id__in=ids, outcome=AttemptOutcome.IN_PROGRESS).count()
    left = states(ids)
    assert in_flight > 0 and left["accepted"] > in_flight, "the kill came too late to test anything"
    live.start_worker(env=batches_of_250)
    final = wait_for_all(ids, {"delivered"}, timeout=180)
    assert final == {"delivered": 1200}
    per_message = accepted_sends_per_message(live)
    assert set(per_message) == set(ids) and max(per_message.values()) == 1, "a message was accepted twice"
    outcomes = DispatchAttempt.objects.filter(message_id__in=ids)
    lost = outcomes.filter(outcome=AttemptOutcome.WORKER_LOST).count()
    found = outcomes.filter(outcome=AttemptOutcome.FOUND_AT_PROVIDER).count()
    # Each call the kill cut off was closed as lost and looked up (the found ones not resent),
    # unless its receipt came first: then the message was delivered and nothing was left to claim.
    # Which of the two a cut-off call that reached the provider takes depends on how fast the new
    # worker starts; some must have reached it, or the kill tested nothing.
    overtaken = outcomes.filter(outcome=AttemptOutcome.IN_PROGRESS).count()
    assert lost + overtaken == in_flight and found <= lost and found + overtaken > 0
    print(
        f"1,200 bulk messages: killed with {in_flight} sends in flight and {left['accepted'] - in_flight} "
        f"not yet started; {found} found at the provider by the look-up, {overtaken} delivered by their "
        "receipt first; 0 accepted twice"
    )
