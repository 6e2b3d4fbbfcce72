"""What the benchmarks share: bootstrap, a fresh database, the stack at production timings,
posting through the batch API, the raw Celery no-op baseline, worker RSS/CPU, percentiles and
the figures table every script prints (and bench/run_all.py gathers into bench/results.md).

Import it first thing from a script under bench/ (`from _support import ...`: a script's own
directory is on sys.path); it puts the repository root on sys.path. Nothing here starts
anything at import; every process is started through tests.support (Stack, ManagedProcess),
which stops it by pid, and callers stop them in a `finally`.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DONE_STATES = ("dispatched", "delivered", "read")
FAILED_STATES = ("undelivered", "failed", "expired", "cancelled", "dead_lettered")
# Production's split (Procfile): urgent traffic, beat's jobs (sweeper, polling, anomalies) and bulk
# each on workers of their own.
URGENT_QUEUES = (
    "sms.critical,sms.transactional,whatsapp.critical,whatsapp.transactional,email.critical,email.transactional"
)
MAINTENANCE_QUEUES = "maintenance"
BULK_QUEUES = "sms.bulk,whatsapp.bulk,email.bulk"
# The Procfile's bulk worker runs at this niceness: on a shared box, a campaign yields the CPU to
# critical sends (BULK_NICE=0 in the environment: as before).
BULK_NICE = int(os.environ.get("BULK_NICE", "10"))


# --- bootstrap ------------------------------------------------------------------------------------
def bootstrap(database: str, settings: str = "conductor_project.settings.test") -> None:
    """Point this process's Django at `database` (call before django.setup())."""
    os.environ["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{database}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", settings)
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


def recreate_database(name: str) -> None:
    """DROP (disconnecting anyone still on it) and CREATE `name`."""
    import psycopg

    with psycopg.connect(ADMIN_DSN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")


def fresh_database(name: str) -> str:
    """A new, migrated `name` with Django set up on it; returns an API key for the bench client."""
    import django

    bootstrap(name)
    django.setup()
    from django.core.management import call_command
    from django.db import connections

    connections.close_all()  # a second run in the same process (scaling) reconnects to the new one
    recreate_database(name)
    call_command("migrate", verbosity=0)
    from messaging.services import api_key_create

    return api_key_create(client_name="bench")[1]


def stop_on_sigterm() -> None:
    """A SIGTERM (make, run_all, a CI timeout) unwinds like Ctrl-C, so every `finally` stops its processes."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def stop_stack(stack) -> None:
    """stack.stop() with SIGINT/SIGTERM held back until it is done: a signal arriving during the
    stop would otherwise abort it halfway and leave the rest of the stack running."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        stack.stop()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


# --- the stack ------------------------------------------------------------------------------------
def production_stack(database: str, broker: str = "redis", host: str = "127.0.0.1", prefix: Sequence[str] = ()):
    """A tests.support Stack (not started) with production timings instead of the tests' short ones,
    on a Redis broker of its own or (`broker="rabbitmq"`) a RabbitMQ node of its own; `host` and
    `prefix` put it on another host (bench/multi_host.py; tests/support/netns.py).

    The test settings count a queued task stale after 3-10 s and re-publish it, which a backlog of
    thousands always is (see bench/README.md, ordering); base settings count it stale after 15 s
    critical, 60 s transactional, 600 s bulk. The sweeper runs every 5 s, anomaly detection and the
    circuit breaker at their defaults.
    """
    from tests.support.stack import Stack

    stack = Stack(database, broker=broker, host=host, prefix=prefix)
    stack.env["DJANGO_SETTINGS_MODULE"] = "conductor_project.settings.base"
    stack.env["CONDUCTOR_SWEEP_INTERVAL_SECONDS"] = "5"
    stack.intake_processes = 2  # as the Procfile
    for name in ("CONDUCTOR_ANOMALY_INTERVAL_SECONDS", "CONDUCTOR_CIRCUIT_OPEN_SECONDS"):
        stack.env.pop(name, None)
    return stack


def start_queue_worker(
    stack,
    name: str,
    queues: str,
    concurrency: int,
    timeout_s: float = 90.0,
    nice: int = 0,
    prefix: Sequence[str] | None = None,
):
    """A Conductor worker on `queues` only (Stack.start_worker takes every queue), at niceness
    `nice` (the Procfile's bulk worker: 10), on the stack's host or through `prefix` (another
    host's); returns (process, time.time() when it logged ready). Stopped by stack.stop()."""
    from tests.support.processes import PYTHON, wait_until

    cmd = ["nice", "-n", str(nice)] if nice else []
    cmd += [PYTHON, "-m", "celery", "-A", "conductor_project", "worker", "-l", "info", "-n", f"{name}@%h"]
    cmd += ["-c", str(concurrency), "-Q", queues, "--without-gossip", "--without-mingle"]
    worker = stack._spawn(name, cmd, prefix=prefix)
    wait_until(lambda: " ready." in worker.log_text() or not worker.alive(), timeout_s, 0.05, what=f"{name} ready")
    ready = time.time()
    if not worker.alive():
        raise RuntimeError(f"{name} exited on start:\n{worker.log_text()[-3000:]}")
    stack.workers.append(worker)
    return worker, ready


# --- posting through the API ----------------------------------------------------------------------
@dataclass
class PostResult:
    items: int
    created: int
    batches: int
    clients: int
    first_request: float  # time.time()
    last_response: float
    batch_latencies_s: list[float] = field(default_factory=list)

    @property
    def elapsed_s(self) -> float:
        return self.last_response - self.first_request

    @property
    def rate(self) -> float:
        return self.created / self.elapsed_s if self.elapsed_s > 0 else 0.0


def post_batches(
    stack, key: str, items: list[dict], clients: int, batch_size: int = 1000, label: str = "ingest"
) -> PostResult:
    """POST `items` to /api/v1/messages/batch/ in batches of `batch_size` from `clients` threads,
    each with its own connection; progress every 10 %. Raises if any item was not created."""
    chunks: queue.SimpleQueue[list[dict]] = queue.SimpleQueue()
    batches = 0
    for start in range(0, len(items), batch_size):
        chunks.put(items[start : start + batch_size])
        batches += 1
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    state = {"created": 0, "first": None, "last": 0.0, "done": 0, "reported": 0}

    def client() -> None:
        session = stack.api(key)
        try:
            while not stop.is_set():
                try:
                    chunk = chunks.get_nowait()
                except queue.Empty:
                    return
                began = time.time()
                with lock:
                    state["first"] = began if state["first"] is None else min(state["first"], began)
                response = session.post(
                    f"{stack.web_url}/api/v1/messages/batch/", json={"messages": chunk}, timeout=300
                )
                ended = time.time()
                response.raise_for_status()
                body = response.json()
                if body.get("created", 0) + body.get("replayed", 0) != len(chunk):
                    refused = body.get("failed")
                    raise RuntimeError(f"batch: {refused} of {len(chunk)} items refused: {body['results'][:2]}")
                with lock:
                    latencies.append(ended - began)
                    state["created"] += body["created"]
                    state["last"] = max(state["last"], ended)
                    state["done"] += 1
                    tenth = state["done"] * 10 // batches
                    if tenth > state["reported"]:
                        state["reported"] = tenth
                        share = state["done"] * 100 // batches
                        print(f"  {label}: {share} % ({state['created']:,} messages)", flush=True)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=client, daemon=True, name=f"client{i}") for i in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():  # join with a timeout, so Ctrl-C reaches the main thread
                thread.join(0.5)
    finally:
        stop.set()
    if errors:
        raise RuntimeError(f"posting failed: {errors[0]!r}") from errors[0]
    return PostResult(
        items=len(items),
        created=state["created"],
        batches=batches,
        clients=clients,
        first_request=state["first"] or time.time(),
        last_response=state["last"],
        batch_latencies_s=latencies,
    )


def sms_campaign(count: int, category: str, offset: int = 0) -> list[dict]:
    """`count` bulk SMS to distinct, valid US numbers (+1415555xxxx and up)."""
    return [
        {
            "channel": "sms",
            "to": f"+1415{5550000 + offset + i:07d}",
            "body": f"Spring sale: 20 % off this week. Reply STOP to opt out. ({i})",
            "priority": "bulk",
            "category": category,
        }
        for i in range(count)
    ]


# --- processes: RSS and CPU of a worker tree ------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc/<pid>/task/*/children."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(child) for child in (task / "children").read_text().split())
            except OSError:
                pass  # the thread or process ended meanwhile
    return pids


def rss_mb(pid: int) -> float:
    """VmRSS of a process tree (the worker's main process plus its pool children), MiB."""
    total_kb = 0
    for each in process_tree(pid):
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except OSError:
            pass
    return total_kb / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process tree, including its reaped children (cutime, cstime)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for each in process_tree(pid):
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime (fields 14-17)
    return total / ticks


# --- the raw Celery baseline ----------------------------------------------------------------------
@dataclass
class Baseline:
    tasks: int
    workers: int
    concurrency: int
    rate: float
    rss_mb: float  # the no-op worker trees, summed, at the end of the drain

    def describe(self) -> str:
        return f"{self.rate:,.0f} tasks/s raw Celery no-op ({self.workers} worker x -c {self.concurrency})"


def noop_baseline(stack, tasks: int, workers: int, concurrency: int) -> Baseline:
    """Raw Celery no-op tasks/s on the stack's own broker: `tasks` published up front to the queue
    bench.noop, then `workers` workers (prefork, -c `concurrency`, production's task settings: see
    bench/noop_app.py) started and timed from the first task to the drained queue. The workers are
    stopped before this returns."""
    import noop_app
    import redis

    from tests.support.processes import PYTHON, ManagedProcess

    client = redis.Redis.from_url(stack.broker_url)
    client.delete(noop_app.COUNTER_KEY, noop_app.QUEUE)
    noop_app.publish(tasks, stack.broker_url)
    queued = client.llen(noop_app.QUEUE)
    if queued != tasks:
        raise RuntimeError(f"published {tasks} no-op tasks but {queued} are queued")
    # No inherited CELERY_* setting may change the app (CELERY_BROKER_URL would override its broker).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLOWER_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    python_path = [str(BENCH_DIR), *filter(None, [env.get("PYTHONPATH")])]
    env.update(
        BENCH_BROKER_URL=stack.broker_url, CELERY_BROKER_URL=stack.broker_url, PYTHONPATH=os.pathsep.join(python_path)
    )
    procs = []
    try:
        for n in range(workers):
            cmd = [PYTHON, "-m", "celery", "-A", "noop_app", "worker", "-c", str(concurrency), "-P", "prefork"]
            cmd += ["--without-gossip", "--without-mingle", "-l", "warning", "-n", f"noop{n}@%h"]
            procs.append(ManagedProcess(f"noop{n}", cmd, env, stack.log_dir).start())
        try:
            rate, _, _ = noop_app.drain_rate(client, tasks, alive=lambda: all(p.alive() for p in procs))
        except RuntimeError:
            print("\n".join(p.log_text()[-2000:] for p in procs), file=sys.stderr)
            raise
        rss = sum(rss_mb(p.pid) for p in procs)
    finally:
        for proc in procs:
            proc.stop()
    client.delete(noop_app.COUNTER_KEY)
    return Baseline(tasks=tasks, workers=workers, concurrency=concurrency, rate=rate, rss_mb=rss)


# --- figures --------------------------------------------------------------------------------------
def percentile(values: Iterable[float], share: float) -> float:
    """Nearest-rank percentile (share 0..1); nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


@dataclass
class Figure:
    """One row of the results table."""

    benchmark: str
    figure: str
    value: str
    baseline: str = "-"
    target: str = "-"  # ratio against the baseline and/or the target
    verdict: str = "info"  # PASS, FLOOR (met the floor, not the target), FAIL, info


TABLE_HEADER = "| benchmark | figure | value | baseline | ratio / target | verdict |\n|---|---|---:|---|---|---|"


def figure_row(fig: Figure) -> str:
    return f"| {fig.benchmark} | {fig.figure} | {fig.value} | {fig.baseline} | {fig.target} | {fig.verdict} |"


def print_figures(figures: list[Figure]) -> None:
    print("\n" + TABLE_HEADER)
    for fig in figures:
        print(figure_row(fig))
    sys.stdout.flush()


def write_json(path: str | None, figures: list[Figure], details: dict[str, Any]) -> None:
    if not path:
        return
    payload = {"figures": [asdict(f) for f in figures], "details": details}
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}", flush=True)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
