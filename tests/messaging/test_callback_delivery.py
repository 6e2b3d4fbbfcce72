"""Callback delivery against a real client endpoint (tests/support/callback_receiver.py, a process
of its own that verifies signatures with the standardwebhooks library and injects faults).

The deliverer runs in the test process here (messaging.callbacks.delivery, as the task runs it),
except for the SIGKILL test, which runs real Celery workers. Timings are the test settings'
(CALLBACK_TIMEOUT_SECONDS 1, backoff 0.2 s doubling up to 2 s, lease 4 s).
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from datetime import datetime, timedelta

import pytest
import redis
from django.conf import settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from messaging.callbacks import delivery
from messaging.callbacks.delivery import callbacks_deliver, endpoint_circuit
from messaging.callbacks.signing import new_secret
from messaging.callbacks.trigger import (
    RUNNING_KEY,
    callbacks_due_within,
    callbacks_kick,
    callbacks_sweep,
    endpoints_pause,
    endpoints_paused,
)
from messaging.models import Callback, CallbackEndpoint
from providers.circuit import OPEN, CircuitSettings
from providers.redis_state import shared_redis
from tests.support.callback_receiver import ReceiverProcess
from tests.support.processes import PYTHON, ManagedProcess, free_port, wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture
def receivers():
    """start(faults=None, secrets=None) -> a receiver process; every one stopped by pid after the test."""
    started: list[ReceiverProcess] = []

    def start(faults=None, secrets=None):
        receiver = ReceiverProcess(secrets=secrets or [new_secret()], faults=faults)
        started.append(receiver)
        return receiver.start()

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture
def endpoint_for(client_key):
    """A client endpoint posting to `url`, signed with `secret` (the receiver's first)."""

    def make(url: str, secret: str) -> CallbackEndpoint:
        now = timezone.now()
        return CallbackEndpoint.objects.create(
            client=client_key[0],
            url=url,
            secrets=[{"secret": secret, "created_at": now.isoformat(), "expires_at": None}],
        )

    return make


@pytest.fixture
def outbox(make_message):
    """Callback rows as the outbox writer leaves them: callbacks(endpoint, events, message=None)."""

    def write(
        endpoint: CallbackEndpoint, events=("accepted", "dispatched", "delivered"), message=None
    ) -> list[Callback]:
        message = message or make_message()
        now = timezone.now()
        rows = []
        for sequence, event in enumerate(events, start=1):
            occurred = now + timedelta(milliseconds=sequence)
            rows.append(
                Callback(
                    webhook_id="msg_" + uuid.uuid4().hex,
                    endpoint=endpoint,
                    message=message,
                    event=event,
                    sequence=sequence,
                    occurred_at=occurred,
                    payload={
                        "type": f"message.{event}",
                        "timestamp": occurred.isoformat(),
                        "data": {"message_id": str(message.pk), "event": event, "sequence": sequence},
                    },
                    next_attempt_at=now,
                    created_at=now,
                )
            )
        return Callback.objects.bulk_create(rows)

    return write


def _by_id(records):
    grouped = defaultdict(list)
    for record in records:
        grouped[record["webhook_id"]].append(record)
    return grouped


def test_callbacks_are_delivered_signed_once_each(receivers, endpoint_for, outbox):
    receiver = receivers()
    endpoint = endpoint_for(receiver.url("/a"), receiver.secrets[0])
    rows = [row for _ in range(5) for row in outbox(endpoint)]

    report = callbacks_deliver(budget_s=30)

    assert report.delivered == len(rows) == 15
    records = receiver.records()
    assert sorted(r["webhook_id"] for r in records) == sorted(row.webhook_id for row in rows)
    assert all(r["verified"] and r["answer"] == 200 and r["path"] == "/a" for r in records)
    sent = {r["webhook_id"]: r for r in records}
    for row in Callback.objects.filter(pk__in=[r.pk for r in rows]):
        assert row.state == "delivered" and row.delivered_at is not None and row.lease_expires_at is None
        assert row.attempts == 1 and [entry["status"] for entry in row.attempt_log] == [200]
        assert sent[row.webhook_id]["body"] == row.payload
        assert sent[row.webhook_id]["headers"]["user-agent"] == "Conductor-Callbacks/1"
    assert not shared_redis().exists(RUNNING_KEY)  # it said it stopped


def test_a_500_is_retried_with_the_same_webhook_id_until_delivered(receivers, endpoint_for, outbox):
    receiver = receivers(faults={"fail_first": 2, "fail_first_status": 500})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    (row,) = outbox(endpoint, events=["delivered"])

    callbacks_deliver(budget_s=30)

    row.refresh_from_db()
    assert row.state == "delivered" and row.attempts == 3
    assert [entry["status"] for entry in row.attempt_log] == [500, 500, 200]
    assert row.attempt_log[0]["error"] == "HTTP 500"
    records = receiver.records()
    assert [r["webhook_id"] for r in records] == [row.webhook_id] * 3
    assert all(r["verified"] for r in records)
    # Each retry after a full-jitter wait: at most 0.2 s, then 0.4 s (plus a write and a claim).
    assert records[1]["at"] - records[0]["at"] < 1.5 and records[2]["at"] - records[1]["at"] < 1.5


def test_a_400_is_final_and_parked_at_once(receivers, endpoint_for, outbox):
    receiver = receivers(faults={"fail_first": 1, "fail_first_status": 400})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    first, second = outbox(endpoint, events=["dispatched", "delivered"])

    callbacks_deliver(budget_s=30)

    first.refresh_from_db()
    second.refresh_from_db()
    assert first.state == "dead_lettered" and first.attempts == 1 and first.dead_lettered_at is not None
    assert first.last_error == "HTTP 400" and first.attempt_log[0]["status"] == 400
    # A dead-lettered callback does not hold up the next one of its message (also refused once).
    assert second.state == "dead_lettered"
    assert len(receiver.records()) == 2
    endpoint.refresh_from_db()
    assert endpoint.failing_since is not None  # refused is not accepted


def test_in_production_a_host_inside_our_network_is_final_and_never_reached(receivers, endpoint_for, outbox, settings):
    """SSRF: an endpoint written before the rule, or a name that resolves inside (here, the
    receiver on 127.0.0.1), is refused when the connection is opened; not retried."""
    settings.CONDUCTOR = {**settings.CONDUCTOR, "CALLBACK_ALLOW_PRIVATE_NETWORKS": False}
    receiver = receivers()
    endpoint = endpoint_for(receiver.url().replace("127.0.0.1", "localhost"), receiver.secrets[0])
    [row] = outbox(endpoint, events=["delivered"])

    callbacks_deliver(budget_s=30)

    row.refresh_from_db()
    assert row.state == "dead_lettered" and row.attempts == 1
    assert "localhost resolves to 127.0.0.1: not a public address" in row.attempt_log[0]["error"]
    assert receiver.records() == []


def test_retry_after_is_honoured(receivers, endpoint_for, outbox):
    receiver = receivers(faults={"fail_first": 1, "fail_first_status": 429, "retry_after": "2"})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    (row,) = outbox(endpoint, events=["delivered"])

    callbacks_deliver(budget_s=30)

    records = receiver.records()
    assert [r["answer"] for r in records] == [429, 200]
    # Without it the wait is at most 0.2 s (the test settings' base).
    assert records[1]["at"] - records[0]["at"] >= 1.9
    row.refresh_from_db()
    assert row.state == "delivered" and [e["status"] for e in row.attempt_log] == [429, 200]


def test_a_timeout_is_retried(receivers, endpoint_for, outbox):
    receiver = receivers(faults={"fail_first": 1, "fail_first_status": "held", "hold_seconds": 5})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    (row,) = outbox(endpoint, events=["delivered"])

    callbacks_deliver(budget_s=30)

    row.refresh_from_db()
    assert row.state == "delivered" and row.attempts == 2
    timeout, delivered = row.attempt_log
    assert timeout["status"] is None and "no answer within 1 s" in timeout["error"]
    assert 900 <= timeout["latency_ms"] < 2000
    assert delivered["status"] == 200
    assert [r["webhook_id"] for r in receiver.records()] == [row.webhook_id] * 2


def test_per_message_callbacks_go_in_sequence_order_even_when_earlier_ones_need_retries(
    receivers, endpoint_for, outbox, monkeypatch
):
    # Every callback is refused twice: each message's next one may only leave once the one
    # before it is delivered. (So many failures would open the endpoint's circuit: not here.)
    lenient = CircuitSettings(failure_rate_threshold=1.0, minimum_calls=20)
    monkeypatch.setattr(delivery, "endpoint_circuit_settings", lambda timeout_s: lenient)
    receiver = receivers(faults={"fail_first": 2, "fail_first_status": 503})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    messages = [outbox(endpoint, events=["accepted", "dispatched", "delivered", "read"]) for _ in range(6)]

    callbacks_deliver(budget_s=60)

    records = receiver.records()
    assert len(records) == 6 * 4 * 3
    for rows in messages:
        sequence_of = {row.webhook_id: row.sequence for row in rows}
        arrivals = [
            (r["at"], sequence_of[r["webhook_id"]], r["answer"]) for r in records if r["webhook_id"] in sequence_of
        ]
        seen = [sequence for _, sequence, _ in sorted(arrivals)]
        assert seen == sorted(seen), seen  # never a later one before an earlier one is through
        assert all(Callback.objects.get(pk=row.pk).state == "delivered" for row in rows)


def test_a_dead_endpoint_opens_its_circuit_and_costs_a_healthy_one_nothing(receivers, endpoint_for, outbox):
    healthy = receivers()
    dead_url = f"http://127.0.0.1:{free_port()}/gone"  # nothing listens: connection refused
    dead = endpoint_for(dead_url, new_secret())
    good = endpoint_for(healthy.url(), healthy.secrets[0])
    dead_rows = [row for _ in range(60) for row in outbox(dead, events=["delivered"])]
    good_rows = [row for _ in range(60) for row in outbox(good, events=["delivered"])]

    began = time.monotonic()
    report = callbacks_deliver(budget_s=30)
    elapsed = time.monotonic() - began

    assert Callback.objects.filter(pk__in=[r.pk for r in good_rows], state="delivered").count() == 60
    assert len(healthy.records()) == 60
    assert endpoint_circuit(dead.pk).state() == OPEN
    attempted = Callback.objects.filter(pk__in=[r.pk for r in dead_rows], attempts__gt=0).count()
    # The circuit opened after its window's minimum of failures; the rest wait, unattempted,
    # until it half-opens (not sooner), and the deliverer did not wait for them.
    assert 10 <= attempted <= 40, attempted
    assert report.delivered == 60 and report.retried == attempted
    assert Callback.objects.filter(pk__in=[r.pk for r in dead_rows], state="pending", attempts=0).exists()
    # Held back until it half-opens: no reason for the sweeper to start a deliverer meanwhile.
    assert dead.pk in endpoints_paused()
    assert not callbacks_due_within(now=timezone.now())
    assert elapsed < 10
    dead.refresh_from_db()
    good.refresh_from_db()
    assert dead.failing_since is not None and good.failing_since is None


def test_an_endpoint_back_after_an_outage_gets_its_callbacks_once_the_circuit_half_opens(
    receivers, endpoint_for, outbox, monkeypatch, broker
):
    quick = CircuitSettings(open_seconds=1.0, minimum_calls=10, window_size=20, trial_timeout_seconds=5.0)
    monkeypatch.setattr(delivery, "endpoint_circuit_settings", lambda timeout_s: quick)
    receiver = receivers(faults={"status": 503})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    rows = [row for _ in range(40) for row in outbox(endpoint, events=["delivered"])]

    # The circuit opens after 10 failures; then a trial each time it half-opens (every second),
    # which fails and opens it again. The deliverer hands over after 3 s (its budget).
    callbacks_deliver(budget_s=3)
    assert endpoint_circuit(endpoint.pk).state() in (OPEN, "half_open")
    assert len(receiver.records()) < 30

    receiver.faults(status=200)
    time.sleep(1.2)
    callbacks_deliver(budget_s=30)  # trials first (one at a time), then the rest once it closed

    assert Callback.objects.filter(pk__in=[r.pk for r in rows], state="delivered").count() == 40
    assert endpoint_circuit(endpoint.pk).state() == "closed"
    endpoint.refresh_from_db()
    assert endpoint.failing_since is None
    # Held-back callbacks were not attempts: each delivered one was sent once more than it failed.
    assert sum(Callback.objects.get(pk=r.pk).attempts for r in rows) == len(receiver.records())


def test_a_success_clears_failing_since(receivers, endpoint_for, outbox):
    receiver = receivers(faults={"fail_first": 1, "fail_first_status": 500})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    CallbackEndpoint.objects.filter(pk=endpoint.pk).update(failing_since=timezone.now() - timedelta(hours=3))
    outbox(endpoint, events=["delivered"])

    callbacks_deliver(budget_s=30)

    endpoint.refresh_from_db()
    assert endpoint.failing_since is None


def test_the_retry_window_ends_in_a_dead_letter(receivers, endpoint_for, outbox, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "CALLBACK_RETRY_WINDOW_SECONDS": 1.5}
    receiver = receivers(faults={"status": 500})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    (row,) = outbox(endpoint, events=["delivered"])

    callbacks_deliver(budget_s=30)

    row.refresh_from_db()
    assert row.state == "dead_lettered" and row.attempts >= 2
    assert all(entry["status"] == 500 for entry in row.attempt_log)
    assert row.attempts == len(receiver.records())


@pytest.fixture
def broker():
    """The test broker's database, emptied after the test: the tasks it publishes are not for later tests' workers."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.flushdb()
    yield client
    client.flushdb()


def test_the_sweeper_kicks_once_for_due_callbacks(endpoint_for, outbox, broker):
    endpoint = endpoint_for("http://127.0.0.1:9/never", new_secret())
    assert not callbacks_sweep(now=timezone.now())  # nothing due
    outbox(endpoint, events=["accepted", "delivered"])
    assert callbacks_sweep(now=timezone.now())
    assert shared_redis().ttl(RUNNING_KEY) > 0
    assert not callbacks_kick()  # one is queued: the flag holds further kicks off
    assert broker.llen("callbacks") == 1
    # A leased callback and the one behind it are no reason to kick.
    shared_redis().delete(RUNNING_KEY)
    Callback.objects.filter(sequence=1).update(lease_expires_at=timezone.now() + timedelta(seconds=30))
    assert not callbacks_sweep(now=timezone.now())


# --- a real worker, killed mid-delivery ------------------------------------------------------------
def _worker(tmp_path, name: str, env: dict[str, str]) -> ManagedProcess:
    args = [PYTHON, "-m", "celery", "-A", "conductor_project", "worker", "-l", "info", "-n", f"{name}@%h"]
    args += ["-c", "1", "-Q", "callbacks", "--without-gossip", "--without-mingle"]
    worker = ManagedProcess(name, args, env, tmp_path).start()
    wait_until(lambda: " ready." in worker.log_text(), 60, what=f"{name} ready")
    return worker


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_delivery_loses_nothing_and_resends_with_the_same_webhook_id(
    receivers, endpoint_for, outbox, tmp_path, broker, no_stack_workers
):
    import os

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "conductor_project.settings.test",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{settings.DATABASES['default']['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        # Lease 16 s: on a loaded machine the claimed rows are still leased when the test looks.
        "CONDUCTOR_CALLBACK_TIMEOUT_SECONDS": "8",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    # Each request held 1.5 s: the kill lands while the first ones are in flight.
    receiver = receivers(faults={"latency_ms": 1500})
    endpoint = endpoint_for(receiver.url(), receiver.secrets[0])
    rows = [row for _ in range(20) for row in outbox(endpoint, events=["delivered"])]
    workers = []
    try:
        workers.append(_worker(tmp_path, "first", env))
        assert callbacks_kick()
        wait_until(lambda: receiver.summary()["requests"] >= 16, 30, interval=0.05, what="requests in flight")
        killed_at = timezone.now()
        workers[0].kill()
        in_flight = {r["webhook_id"] for r in receiver.records()}
        # Sent and never recorded: the kill landed mid-delivery (the re-sends below show it too).
        assert not Callback.objects.filter(state="delivered").exists()

        receiver.faults(latency_ms=0)
        workers.append(_worker(tmp_path, "second", env))

        def swept_and_delivered() -> bool:
            callbacks_sweep(now=timezone.now())  # what beat runs every few seconds
            return Callback.objects.filter(state="delivered").count() == len(rows)

        wait_until(swept_and_delivered, 60, interval=0.5, what="every callback delivered after the kill")
    finally:
        for worker in workers:
            worker.stop()

    records = receiver.records()
    assert {r["webhook_id"] for r in records} == {row.webhook_id for row in rows}
    assert all(r["verified"] for r in records)
    per_id = _by_id(records)
    assert all(len(per_id[webhook_id]) >= 2 for webhook_id in in_flight)  # the same id, again
    for row in Callback.objects.filter(webhook_id__in=in_flight):
        # The dead worker's request reached the receiver and was never recorded as an attempt:
        # every attempt recorded was made after the kill (by the second worker: more than one on
        # a loaded machine, where a slow answer or a refused connection is tried again).
        assert row.attempts == len(row.attempt_log) >= 1
        assert all(datetime.fromisoformat(entry["at"]) >= killed_at for entry in row.attempt_log), row.attempt_log


def test_metrics_show_attempts_by_outcome_and_reason_and_the_backlog_per_endpoint(
    receivers, endpoint_for, outbox, client
):
    def scrape() -> dict[str, dict[tuple, float]]:
        text = client.get("/metrics").content.decode()
        return {
            family.name: {tuple(sorted(s.labels.items())) + (s.name,): s.value for s in family.samples}
            for family in text_string_to_metric_families(text)
        }

    receiver = receivers(faults={"fail_first": 1, "fail_first_status": 429})
    behind = endpoint_for("http://127.0.0.1:9/never", new_secret())
    waiting = outbox(behind, events=["accepted", "delivered"])
    Callback.objects.filter(pk__in=[row.pk for row in waiting]).update(
        next_attempt_at=timezone.now() - timedelta(minutes=5)
    )
    endpoint_circuit(behind.pk).reset()
    endpoints_pause({behind.pk: time.time() + 60})  # its circuit is open: not sent now
    before = scrape()
    good = endpoint_for(receiver.url(), receiver.secrets[0])
    outbox(good, events=["delivered"])

    callbacks_deliver(budget_s=30)

    after = scrape()

    def grew(family: str, **labels) -> float:
        key = (*sorted(labels.items()), family + ("_total" if family.endswith(("sent", "failed")) else ""))
        return after.get(family, {}).get(key, 0.0) - before.get(family, {}).get(key, 0.0)

    assert grew("conductor_callbacks_sent", outcome="delivered") == 1
    assert grew("conductor_callbacks_sent", outcome="retry") == 1
    assert grew("conductor_callbacks_failed", reason="http_429") == 1
    assert after["conductor_callback_latency_seconds"][("conductor_callback_latency_seconds_count",)] >= 1
    assert after["conductor_callback_request_seconds"][("conductor_callback_request_seconds_count",)] >= 2
    ages = after["conductor_callback_backlog_age_seconds"]
    assert 299 < ages[(("endpoint", str(behind.pk)), "conductor_callback_backlog_age_seconds")] < 400
    assert (("endpoint", str(good.pk)), "conductor_callback_backlog_age_seconds") not in ages  # none left
    assert after["conductor_callbacks_pending"][("conductor_callbacks_pending",)] == 2
