"""A broker restart never costs a worker (issue 25): the stack's own redis-server is killed and
started again, empty, 20 times while transactional and bulk messages are accepted and drained.
No worker is replaced or restarted: every worker (and beat) started before the first restart is
still running after the last, and every message reached the provider exactly once and ended
delivered. What the restarts emptied from the broker the sweeper publishes again, by design."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest

from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import post_batch, states

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

RESTARTS = 20
RESTART_EVERY_SECONDS = 2.5
BATCHES = 12  # posted while the restarts go on, one every RESTARTS * RESTART_EVERY_SECONDS / BATCHES s
PER_BATCH = {"transactional": 20, "bulk": 20}  # 480 messages in all
ACK_LOST = "Couldn't ack"  # Celery's log line for a task that finished after its connection was lost


@pytest.mark.workers(count=2, concurrency=4)
def test_twenty_redis_restarts_under_load_cost_no_worker_and_lose_or_double_no_message(live):
    key = api_key_create(client_name="acme")[1]
    # Each send holds its task (unacknowledged) for a while, so restarts find tasks in flight:
    # the moment kombu's Redis transport used to take the worker down (conductor_project/kombu_fixes.py).
    live.sandbox_faults("twilio", latency_ms=100, latency_max_ms=400)
    processes = [*live.workers, live.beat]
    pids = {process.name: process.pid for process in processes}
    restarted: list[float] = []

    def restart_redis_repeatedly() -> None:
        for _ in range(RESTARTS):
            time.sleep(RESTART_EVERY_SECONDS)
            live.restart_redis()  # SIGKILL, then a new empty redis-server on the same port
            restarted.append(time.monotonic())

    started = time.monotonic()
    chaos = threading.Thread(target=restart_redis_repeatedly)
    chaos.start()
    ids: list[str] = []
    for batch in range(BATCHES):
        items = [
            {"channel": "sms", "to": f"+1202555{len(ids) + i:04d}", "body": f"{priority} {batch}", "priority": priority}
            for priority, count in PER_BATCH.items()
            for i in range(count)
        ]
        ids += post_batch(live, key, items)  # accepted whether or not the broker answers
        time.sleep(max(0.0, started + (batch + 1) * RESTARTS * RESTART_EVERY_SECONDS / BATCHES - time.monotonic()))
    chaos.join(timeout=120)
    assert not chaos.is_alive() and len(restarted) == RESTARTS

    deadline = time.monotonic() + 90
    while states(ids)["delivered"] < len(ids) and all(p.alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(1)
    print(
        f"\n{len(ids)} messages, {RESTARTS} Redis restarts in {restarted[-1] - started:.0f} s; "
        f"{time.monotonic() - restarted[-1]:.0f} s after the last: {dict(states(ids))}; "
        + "; ".join(
            f"{w.name}: {w.log_text().count('Connection to broker lost')} connections lost, "
            f"{w.log_text().count(ACK_LOST)} acks lost with them"
            for w in live.workers
        )
    )
    dead = {p.name: p.log_text()[-3000:] for p in processes if not p.alive()}
    assert dead == {}, f"exited: {dead}"  # nobody restarts them here: a dead one stays dead
    assert {p.name: p.pid for p in processes} == pids
    assert states(ids) == Counter({"delivered": len(ids)})
    sends = Counter(r["message_id"] for r in live.sandbox_requests(accepted="true"))
    assert set(sends) == set(ids), f"{len(set(ids) - set(sends))} never reached the provider"
    assert {message_id: n for message_id, n in sends.items() if n > 1} == {}  # none sent twice
    for worker in live.workers:  # each worker really lost its broker, again and again
        log = worker.log_text()
        assert log.count("Connection to broker lost") >= RESTARTS // 2 and "Unrecoverable error" not in log
