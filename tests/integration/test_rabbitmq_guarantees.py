"""The guarantees suite with RabbitMQ as the broker (quorum queues, publisher confirms): a provider
outage, per-key order, the broker restarted under load, a worker SIGKILLed mid-send. The stack is
the Redis suite's (tests/support/stack.py) with a RabbitMQ node of its own as broker, started and
restarted by this module (tests/support/rabbitmq.py); Redis still holds circuits and rate limits.
Where a Redis-broker test already says it, it runs here as it is, on this module's `live`."""

from __future__ import annotations

import json
import threading
import time

import pytest
from django.conf import settings
from django.utils import timezone

from messaging.models import AttemptOutcome, DispatchAttempt, Message
from messaging.services import api_key_create
from tests.conftest import serve_live, stop_session_stack_workers
from tests.integration import test_dispatch_flow, test_ordering, test_resilience
from tests.integration.test_dispatch_flow import SMS, accepted_sends_per_message, post_batch, states, wait_for_all
from tests.support.processes import wait_until
from tests.support.rabbitmq import rabbitmq_scripts
from tests.support.stack import Stack

WORKERS, CONCURRENCY = 2, 2
pytestmark = [
    pytest.mark.integration,
    pytest.mark.django_db(transaction=True),
    pytest.mark.workers(count=WORKERS, concurrency=CONCURRENCY),
]


@pytest.fixture(scope="module")
def rabbit_stack(django_db_setup, django_db_blocker):
    """Sandbox, web, beat and workers on the test database with a RabbitMQ node as broker, for
    this module only: the session's Redis-broker stack stops its workers meanwhile (both would
    take the same rows), and this one is gone before the next module's tests."""
    if rabbitmq_scripts() is None:
        pytest.skip("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server; .ci/ensure-services)")
    stop_session_stack_workers()
    stack = Stack(settings.DATABASES["default"]["NAME"], broker="rabbitmq")
    try:
        stack.start(workers=0)
    except Exception:
        stack.stop()
        print(stack.logs())
        raise
    yield stack
    stack.stop()


@pytest.fixture
def live(rabbit_stack, transactional_db, request):
    yield from serve_live(rabbit_stack, request)


@pytest.fixture
def key(live):
    return api_key_create(client_name="acme")[1]


def publish_failures(stack) -> int:
    """Tasks a worker could not publish (each left to the sweeper): a retry's countdown refused
    by the broker would show here."""
    return sum(worker.log_text().count("could not enqueue") for worker in stack.workers)


def sweeper_enqueued(stack, since) -> int:
    """Messages the sweeper published again since `since` (its "sweep: …" log lines)."""
    return sum(
        int(record["message"].split(", ")[1].split()[0])
        for worker in stack.workers
        for record in (json.loads(line) for line in worker.log_text().splitlines() if line.startswith("{"))
        if record["message"].startswith("sweep: ") and record["time"] >= since.isoformat()
    )


def test_with_both_sms_providers_down_the_email_fallback_delivers(live, key):
    test_resilience.test_with_both_sms_providers_down_the_email_fallback_delivers(live, key)


def test_in_a_full_outage_retries_wait_out_their_countdown_in_rabbitmq_and_end_dead_lettered(live, key):
    """Each retry round is a task published with a countdown (critical: up to 10 s), which waits in
    RabbitMQ's delay queues (Celery's native delayed delivery) instead of in a worker's memory."""
    started, seen_delayed, done = timezone.now(), [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen_delayed.append(live.rabbit.delayed())
            time.sleep(0.2)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        test_dispatch_flow.test_in_a_full_outage_critical_messages_end_dead_lettered_never_stuck(live, key)
    finally:
        done.set()
        watcher.join()
    assert max(seen_delayed) > 0, "no retry ever waited in the delay queues"
    # Every retry reached its queue when due: none was left for the sweeper to find.
    assert publish_failures(live) == 0
    assert sweeper_enqueued(live, started) == 0


def test_every_key_reaches_the_provider_in_sequence_order(live):
    """test_ordering's first test at a third of its size (20 keys x 10): ordered messages from 8
    client threads, 10-150 ms sends, 20 % transient errors retried (fast_retry: countdowns under a
    second too)."""
    keys, per_key = 20, 10
    for provider in ("twilio", "vonage"):
        live.sandbox_faults(provider=provider, latency_ms=10, latency_max_ms=150, error_rate=0.2)
    ids = test_ordering.post_concurrently(live, api_key_create(client_name="shop")[1], keys, per_key)
    wait_for_all(ids, {"delivered"}, timeout=240)
    test_ordering.assert_in_sequence_order(live, ids, keys, per_key)
    assert [r for r in live.sandbox_requests(accepted="false") if r["fault"] == "error"], "no error injected"
    assert publish_failures(live) == 0


MESSAGES, DURING_OUTAGE, RESTARTS = 300, 40, 3


def test_rabbitmq_restarted_under_load_loses_and_doubles_nothing_and_every_worker_lives(live, key):
    """Three restarts while 300 transactional SMS drain: stopped as an operator would (with 40
    more posted while it is down: accepted, published later by the sweeper), SIGKILLed, stopped
    again. The same workers, beat and web go on: none is replaced, each reconnects."""
    rabbit = live.rabbit
    queues = rabbit.queues()
    task_queues = [queue.name for queue in settings.CELERY_TASK_QUEUES]
    assert {queues[name]["type"] for name in task_queues} == {"quorum"}
    assert {queue["type"] for name, queue in queues.items() if name.startswith("celery_delayed_")} == {"quorum"}
    live.sandbox_faults("twilio", latency_ms=100, latency_max_ms=300)
    workers, beat, web = list(live.workers), live.beat, live.web
    items = [{**SMS, "to": f"+1202555{i:04d}", "priority": "transactional"} for i in range(MESSAGES)]
    ids = post_batch(live, key, items)

    def sent() -> int:
        return Message.objects.filter(pk__in=ids, dispatched_at__isnull=False).count()

    posted_during_outage: list[str] = []
    for restart in range(RESTARTS):
        target = MESSAGES * (restart + 1) // (RESTARTS + 2)
        wait_until(lambda n=target: sent() >= n, 120, interval=0.2, what=f"{target} sent")
        if restart == 0:
            rabbit.stop()
            extra = [{**SMS, "to": f"+1202556{i:04d}", "priority": "transactional"} for i in range(DURING_OUTAGE)]
            posted_during_outage = post_batch(live, key, extra)
            rabbit.start()
        else:
            live.restart_broker(crash=restart == 1)
    assert sent() < MESSAGES, "the restarts came after the drain: nothing was under load"
    all_ids = ids + posted_during_outage
    final = wait_for_all(all_ids, {"delivered"}, timeout=180)
    assert final == {"delivered": MESSAGES + DURING_OUTAGE}  # nothing lost
    per_message = accepted_sends_per_message(live)
    assert set(per_message) == set(all_ids) and max(per_message.values()) == 1, "a message was accepted twice"
    assert live.workers == workers and all(worker.alive() for worker in workers), "a worker died"
    assert beat.alive() and web.alive()
    for worker in workers:  # each came back to every restarted node on its own
        assert worker.log_text().count("Connected to amqp://") >= RESTARTS + 1, worker.name


def test_a_worker_sigkilled_mid_send_loses_and_doubles_nothing_and_the_other_worker_finishes(live, key):
    """RabbitMQ hands a dead consumer's unacked tasks to the other worker at once (no visibility
    timeout); the killed worker's sends in flight are looked up, not resent. No worker is started
    in its place."""
    live.sandbox_faults(latency_ms=150, latency_max_ms=400)
    items = [{**SMS, "to": f"+1415555{4000 + i:04d}", "category": "fast_retry"} for i in range(60)]
    ids = post_batch(live, key, items)
    wait_until(lambda: len(accepted_sends_per_message(live)) >= 8, 30, what="some sends")
    victim, survivor = live.workers
    live.kill_worker(victim)
    assert states(ids)["accepted"] > 0, "the kill came too late to test anything"
    assert wait_for_all(ids, {"delivered"}, timeout=120) == {"delivered": 60}
    assert max(accepted_sends_per_message(live).values()) == 1, "a message was accepted twice"
    lost = DispatchAttempt.objects.filter(message_id__in=ids, outcome=AttemptOutcome.WORKER_LOST).count()
    assert lost > 0, "the kill caught no send in flight"
    assert survivor.alive() and live.workers == [survivor]
