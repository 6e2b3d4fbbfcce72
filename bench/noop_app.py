"""The raw Celery baseline: a no-op task in a minimal app, configured like Conductor's workers.

Workers run it as `celery -A noop_app worker` with bench/ on PYTHONPATH and the broker in
BENCH_BROKER_URL (the stack's own Redis when a benchmark compares against it). Settings as
production's: acks_late, prefetch 1, reject on worker lost, results ignored, json, no task
events unless BENCH_TASK_EVENTS=1 (bench/worker_events.py measures what they cost). Each task
INCRs COUNTER_KEY, which is how the measuring side counts completions.

The publishing and measuring side is here too (publish, drain_rate), so bench/worker_events.py
and the baselines of bench/_support.py measure the same way: tasks published up front, the
worker started afterwards, tasks/s from the first counted task until all are done and the queue
is empty (worker start-up left out).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import redis
from celery import Celery

COUNTER_KEY = "bench:noop:done"
QUEUE = "bench.noop"

app = Celery("bench_noop", broker=os.environ.get("BENCH_BROKER_URL"))
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    result_backend=None,
    task_send_sent_event=False,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_send_task_events=os.environ.get("BENCH_TASK_EVENTS") == "1",
    task_default_queue=QUEUE,
)
_client: dict[int, redis.Redis] = {}


@app.task(name="bench.noop")
def noop() -> None:
    # One client per pool process, made after the fork.
    client = _client.get(os.getpid())
    if client is None:
        client = _client[os.getpid()] = redis.Redis.from_url(os.environ["BENCH_BROKER_URL"])
    client.incr(COUNTER_KEY)


def publish(tasks: int, broker_url: str) -> None:
    """Publish `tasks` no-op tasks to `broker_url` (up front, before any worker runs)."""
    with app.connection_for_write(broker_url) as connection:
        producer = app.amqp.Producer(connection)
        for _ in range(tasks):
            noop.apply_async(producer=producer)


def drain_rate(
    client: redis.Redis, tasks: int, alive: Callable[[], bool], stall_s: float = 60.0
) -> tuple[float, float, float]:
    """Tasks/s from the first counted task until `tasks` are done and QUEUE is empty.

    Returns (rate, first, end) with first/end on time.time()'s clock. Raises if nothing moves
    for `stall_s` or `alive()` turns false (a worker exited).
    """
    first: tuple[float, int, float] | None = None
    last_progress = time.monotonic()
    last_count = 0
    while True:
        pipe = client.pipeline(transaction=False)
        pipe.get(COUNTER_KEY)
        pipe.llen(QUEUE)
        raw, queued = pipe.execute()
        now, wall = time.monotonic(), time.time()
        count = int(raw or 0)
        if count and first is None:
            first = (now, count, wall)
        if count >= tasks and queued == 0 and first is not None:
            return (count - first[1]) / (now - first[0]), first[2], wall
        if count != last_count:
            last_count, last_progress = count, now
        elif now - last_progress > stall_s:
            raise RuntimeError(f"no progress for {stall_s:.0f} s at {count}/{tasks} done, {queued} queued")
        if not alive():
            raise RuntimeError(f"a no-op worker exited at {count}/{tasks} done")
        time.sleep(0.02)
