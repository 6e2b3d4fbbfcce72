"""What Celery task events (what Flower needs to show tasks) cost in worker throughput.

A real prefork worker (-c 2, production-like settings: acks_late, prefetch 1, reject on worker
lost, results ignored, json) drains N no-op tasks published up front to a private Redis. Each
task INCRs a counter; tasks/s is measured from the counter between the worker's first task and
the queue being drained, so worker start-up is left out (the app, its publishing and this
measurement are bench/noop_app.py, shared with the other benchmarks' baselines). Variants,
interleaved, R times each:
  a  task events off (no -E, worker_send_task_events=False), nobody listening;
  b  task events on (-E, worker_send_task_events=True), nobody listening;
  c  task events on, a Flower process listening on the same broker;
  d  task events off in config, Flower running: Flower broadcasts enable_events every 5 s, so
     this shows whether a running Flower turns them on anyway;
  e  task events off, Flower started with --enable_events=False: Flower still shows the workers
     (heartbeats are sent without -E) but no tasks.
Besides tasks/s it reports Redis PUBLISH calls per task (task events go out in batches, so this
is not an event count: 0 means none were sent) and, for the Flower variants, how many
task-succeeded events Flower received and whether it had the worker online (from its /metrics).

Run: .venv/bin/python bench/worker_events.py [--tasks 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import celery
import noop_app  # bench/noop_app.py: the app the worker, Flower and this script share
import redis
from noop_app import QUEUE

APP_MODULE = "noop_app"
BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    task_events: bool
    flower: bool
    flower_enable_events: bool = True


VARIANTS = [
    Variant("a", "(a) events off", task_events=False, flower=False),
    Variant("b", "(b) events on (-E), no listener", task_events=True, flower=False),
    Variant("c", "(c) events on (-E), Flower running", task_events=True, flower=True),
    Variant("d", "(d) events off in config, Flower running", task_events=False, flower=True),
    Variant(
        "e", "(e) events off, Flower --enable_events=False", task_events=False, flower=True, flower_enable_events=False
    ),
]


@dataclass
class RunResult:
    rate: float
    publishes_per_task: float
    flower_succeeded: int | None = None
    flower_saw_worker: bool | None = None


@dataclass
class Bench:
    """Holds the private Redis and the temp dir every process of a run shares."""

    workdir: Path
    redis_url: str
    client: redis.Redis
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own process group, so its children can be stopped with it."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def stop(proc: subprocess.Popen[bytes] | None, grace_s: float = 15.0) -> None:
    """SIGTERM, then SIGKILL to the whole group; the leader is reaped only after the group is signalled."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    try:  # leftover pool children keep the group id alive, so it cannot name anyone else's group
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def flower_metrics(port: int) -> tuple[int, bool]:
    """Task-succeeded events Flower counted, and whether it has the worker online (from /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    succeeded, online = 0.0, False
    for line in text.splitlines():
        if line.startswith("flower_events_total{") and 'type="task-succeeded"' in line:
            succeeded += float(line.rsplit(" ", 1)[1])
        elif line.startswith("flower_worker_online{") and float(line.rsplit(" ", 1)[1]) == 1.0:
            online = True
    return int(succeeded), online


def publish(bench: Bench, tasks: int) -> None:
    """Publish up front, with the worker not yet running, so publishing is not in the measurement."""
    noop_app.publish(tasks, bench.redis_url)


def measure(bench: Bench, tasks: int, worker: subprocess.Popen[bytes], stall_s: float = 60.0) -> tuple[float, int]:
    """Tasks/s from the first counted task until all are done and the queue is empty; PUBLISH calls meanwhile."""
    rate, _, _ = noop_app.drain_rate(bench.client, tasks, alive=lambda: worker.poll() is None, stall_s=stall_s)
    publishes = int(bench.client.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))
    return rate, publishes


def run_once(bench: Bench, variant: Variant, tasks: int, run_id: str) -> RunResult:
    """One variant, one repeat: fresh Redis data, optional Flower, publish, worker, measure, stop all."""
    bench.client.flushall()
    env = dict(bench.env, BENCH_TASK_EVENTS="1" if variant.task_events else "0")
    flower = worker = None
    flower_port = free_port()
    logs = {name: bench.workdir / f"{run_id}-{name}.log" for name in ("flower", "worker")}
    try:
        if variant.flower:
            cmd = [sys.executable, "-m", "celery", "-A", APP_MODULE, "flower"]
            cmd += [f"--port={flower_port}", "--address=127.0.0.1"]  # tornado options want the = form
            if not variant.flower_enable_events:
                cmd.append("--enable_events=False")
            flower = start(cmd, logs["flower"], env, bench.workdir)
            wait_http(f"http://127.0.0.1:{flower_port}/healthcheck", flower)
            time.sleep(1.0)  # let its event receiver bind before the worker says it is online
        publish(bench, tasks)
        queued = bench.client.llen(QUEUE)
        if queued != tasks:
            raise RuntimeError(f"published {tasks} tasks but {queued} are queued")
        bench.client.config_resetstat()
        cmd = [sys.executable, "-m", "celery", "-A", APP_MODULE, "worker", "-c", "2"]
        cmd += ["--without-gossip", "--without-mingle", "-P", "prefork", "-l", "warning"]
        if variant.task_events:
            cmd.append("-E")
        worker = start(cmd, logs["worker"], env, bench.workdir)
        rate, publishes = measure(bench, tasks, worker)
        result = RunResult(rate=rate, publishes_per_task=publishes / tasks)
        if flower is not None:
            time.sleep(1.0)  # events still in flight to Flower
            result.flower_succeeded, result.flower_saw_worker = flower_metrics(flower_port)
        return result
    except Exception:
        for name, log in logs.items():
            if log.exists():
                print(f"--- {name} log ({log}) ---\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        stop(worker)
        stop(flower)


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A private, non-persistent Redis, so the machine's shared one is never touched."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = start(cmd, workdir / "redis.log", dict(os.environ), workdir)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start:\n{tail(workdir / 'redis.log')}")
            time.sleep(0.05)


def child_env(workdir: Path, redis_url: str) -> dict[str, str]:
    """Drop inherited CELERY_*/FLOWER_* settings: CELERY_BROKER_URL would override the app's broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "FLOWER_"))}
    env.update(BENCH_BROKER_URL=redis_url, CELERY_BROKER_URL=redis_url, PYTHONPATH=str(BENCH_DIR))
    return env


def fmt_cost(base: float, rate: float) -> str:
    return f"{(base - rate) / base * 100:+.1f} %"


def report(results: dict[str, list[RunResult]], tasks: int) -> None:
    base = statistics.median(r.rate for r in results["a"])
    print("| variant | tasks/s median | min | max | cost vs (a) | broker PUBLISH/task | Flower saw |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for variant in VARIANTS:
        runs = results.get(variant.key)
        if not runs:
            continue
        rates = [r.rate for r in runs]
        median = statistics.median(rates)
        publishes = statistics.median(r.publishes_per_task for r in runs)
        if variant.flower:
            seen = "/".join(f"{r.flower_succeeded / tasks:.0%}" for r in runs)
            online = "online" if all(r.flower_saw_worker for r in runs) else "NOT always online"
            flower = f"{seen} of tasks succeeded; worker {online}"
        else:
            flower = "-"
        cost = "-" if variant.key == "a" else fmt_cost(base, median)
        print(
            f"| {variant.label} | {median:.0f} | {min(rates):.0f} | {max(rates):.0f} | {cost} "
            f"| {publishes:.2f} | {flower} |"
        )
    print("\ncost vs (a): throughput lost against events off (median vs median); positive means slower.")
    print("broker PUBLISH/task: task events are batched per message, so this is not an event count.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Throughput on a 2-core machine is skewed by anything else running: each run prints the load average.",
    )
    parser.add_argument("--tasks", type=int, default=20000, help="no-op tasks per run (default 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each variant, interleaved (default 3)")
    parser.add_argument(
        "--variants", default="abcde", help="which variants to run, e.g. 'abcd' (default abcde; a is the baseline)"
    )
    args = parser.parse_args()
    variants = [v for v in VARIANTS if v.key in args.variants]
    if "a" not in args.variants:
        parser.error("variant a is the baseline and must be included")
    # A SIGTERM to this script must still stop Redis, Flower and the worker (the finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    results: dict[str, list[RunResult]] = {v.key: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="worker-events-") as tmp:
        workdir = Path(tmp)
        redis_proc = None
        try:
            redis_proc, port = start_redis(workdir)
            url = f"redis://127.0.0.1:{port}/0"
            env = child_env(workdir, url)
            os.environ.update(BENCH_BROKER_URL=url, CELERY_BROKER_URL=url)
            bench = Bench(workdir=workdir, redis_url=url, client=redis.Redis.from_url(url), env=env)
            print(
                f"celery {celery.__version__}, {os.cpu_count()} cores, {args.tasks} tasks/run, "
                f"{args.repeats} repeats, private redis on :{port}",
                flush=True,
            )
            began = time.monotonic()
            for repeat in range(args.repeats):
                # Rotate the order each repeat so that no variant always runs in the same slot.
                shift = repeat % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    result = run_once(bench, variant, args.tasks, f"{repeat}{variant.key}")
                    results[variant.key].append(result)
                    extra = ""
                    if result.flower_succeeded is not None:
                        extra = f", Flower saw {result.flower_succeeded} succeeded"
                        extra += f", worker online {result.flower_saw_worker}"
                    print(
                        f"  repeat {repeat + 1} {variant.label}: {result.rate:.0f} tasks/s, "
                        f"{result.publishes_per_task:.2f} PUBLISH/task{extra} (load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
            print(f"({time.monotonic() - began:.0f} s)\n")
        finally:
            stop(redis_proc)
    report(results, args.tasks)


if __name__ == "__main__":
    main()
