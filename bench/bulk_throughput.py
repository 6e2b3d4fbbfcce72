"""Bulk campaign end to end (accepted -> dispatched), critical latency meanwhile, worker memory.

Issue 9's (a), (c) and (d), on the real stack at production timings (bench/_support.py), in its
own database (conductor_bench_bulk, dropped and created again):

 1. start the private Redis, the sandbox (Twilio at 50 ms per send; receipts turned off with
    callback_mode final_only and receipt_loss_rate 1.0, so the web process takes no callback:
    bench/lifecycle.py is the run with receipts on), gunicorn
    and beat, but no workers;
 2. ingest the campaign: --messages bulk SMS to distinct numbers through POST
    /api/v1/messages/batch/ (1,000 per request, --clients threads); its tasks wait in the broker;
 3. baseline: raw Celery no-op tasks/s on the same broker with the same worker count, pool and
    concurrency as the bulk workers (bench/noop_app.py), those workers stopped afterwards;
 4. start the urgent worker (critical/transactional queues, -c 2), the maintenance worker (-c 1), as the Procfile,
    and the bulk worker(s) (-Q sms.bulk,whatsapp.bulk,email.bulk), and while the campaign
    drains, post a critical SMS through POST /api/v1/messages/ about --critical-rate times a
    second, one at a time;
 5. when every campaign message is dispatched: throughput = messages / (last dispatched_at -
    first dispatched_at), and messages / (bulk worker ready -> last dispatched_at); critical
    accepted_at -> dispatched_at p50/p95/p99 from the database; bulk worker tree RSS (main
    process plus pool children, /proc VmRSS) when ready, at 50 % dispatched and at the end, and
    its CPU seconds per message; and that each message was sent exactly once: accepted requests
    per message id in the sandbox's request log (GET /_sandbox/requests), or, with --verify
    database (or when the log is too slow to fetch), DispatchAttempt rows with outcome accepted;
 6. the baseline of step 3 again, the stack's workers idle: the ratios are against the higher of
    the two (on a shared host one baseline run alone moved from 468 to 990 tasks/s in a day).

Targets (issue 9, SPEC section 9): throughput >= 2x the no-op baseline (floor 1x); critical p99 <
1 s during a 200,000-message drain; RSS at the end within 10 % of the middle.

Run: .venv/bin/python bench/bulk_throughput.py [--messages 50000] [--json PATH]
     .venv/bin/python bench/bulk_throughput.py --messages 200000
"""

from __future__ import annotations

import argparse
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from _support import (
    BULK_NICE,
    BULK_QUEUES,
    DONE_STATES,
    FAILED_STATES,
    MAINTENANCE_QUEUES,
    URGENT_QUEUES,
    Baseline,
    Figure,
    cpu_s,
    fresh_database,
    noop_baseline,
    percentile,
    post_batches,
    print_figures,
    production_stack,
    rss_mb,
    sms_campaign,
    start_queue_worker,
    stop_on_sigterm,
    stop_stack,
    wait_for,
    write_json,
)

DATABASE = "conductor_bench_bulk"
CAMPAIGN = "bench-campaign"
SANDBOX_LOG_MAX_S = 300  # longer than this to fetch the sandbox's request log: count in the database


@dataclass
class Options:
    messages: int = 50_000
    bulk_workers: int = 1
    concurrency: int = 4  # as the Procfile's worker_bulk
    urgent_concurrency: int = 2
    clients: int = 8
    critical_rate: float = 5.0
    baseline_tasks: int = 20_000
    verify: str = "auto"  # auto | sandbox | database
    stall_s: float = 300.0


@dataclass
class Result:
    options: dict[str, Any]
    ingest_rate: float = 0.0
    ingest_s: float = 0.0
    baseline: dict[str, Any] = field(default_factory=dict)
    baseline_after: dict[str, Any] = field(default_factory=dict)  # the same, once the drain is over
    throughput_dispatch: float = 0.0  # first -> last dispatched_at
    throughput_ready: float = 0.0  # bulk worker ready -> last dispatched_at
    drain_s: float = 0.0
    critical_sent: int = 0
    critical_dispatched: int = 0
    critical_ms: dict[str, float] = field(default_factory=dict)
    rss_mb: dict[str, float] = field(default_factory=dict)  # start, middle, end, peak
    cpu_ms_per_message: float = 0.0
    verified_by: str = ""
    verify_s: float = 0.0
    dispatched_once: int = 0
    duplicates: int = 0
    missing: int = 0
    failed: int = 0
    elapsed_s: float = 0.0


class CriticalSender(threading.Thread):
    """Posts a critical SMS (or one of `priority`) every 1/`rate` s until stopped (open loop: each
    from a pool thread, so a slow API answer delays no later one, and no catch-up burst follows
    it, as independent users signing in would); keeps their ids and each POST's round trip."""

    def __init__(self, stack, key: str, rate: float, priority: str = "critical"):
        super().__init__(daemon=True, name=f"{priority}-sender")
        self.stack, self.key, self.interval, self.priority = stack, key, 1.0 / rate, priority
        self.ids: list[str] = []
        self.post_ms: list[float] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self._local = threading.local()

    def _post(self, n: int) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.stack.api(self.key)
        payload = {
            "channel": "sms",
            "to": f"+1628{5550000 + n:07d}",
            "body": f"Your sign-in code is {100000 + n}",
            "priority": self.priority,
            "category": f"bench-{self.priority}",
        }
        try:
            began = time.perf_counter()
            response = session.post(f"{self.stack.web_url}/api/v1/messages/", json=payload, timeout=30)
            if response.status_code == 201:
                self.post_ms.append((time.perf_counter() - began) * 1000)
                self.ids.append(response.json()["id"])
            else:
                self.errors.append(f"{response.status_code} {response.text[:200]}")
        except Exception as exc:  # noqa: BLE001 - counted and reported, the drain goes on
            self.errors.append(repr(exc))

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16, thread_name_prefix="critical-post") as pool:
            n, next_at = 0, time.monotonic()
            while not self.stopping.is_set():
                pool.submit(self._post, n)
                n += 1
                next_at += self.interval
                self.stopping.wait(max(0.0, next_at - time.monotonic()))


def critical_latency_ms(ids: list[str]) -> tuple[int, dict[str, float]]:
    """(how many of the critical messages `ids` were dispatched, their accepted -> dispatched
    p50 / p95 / p99 / max in ms)."""
    from messaging.models import Message

    latencies = [
        (d - a).total_seconds() * 1000
        for a, d in Message.objects.filter(id__in=ids, dispatched_at__isnull=False).values_list(
            "accepted_at", "dispatched_at"
        )
    ]
    return len(latencies), {
        "p50": percentile(latencies, 0.50),
        "p95": percentile(latencies, 0.95),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies, default=float("nan")),
    }


def campaign_counts() -> tuple[int, int]:
    """(dispatched or later, failed for good) among the campaign's messages."""
    from django.db.models import Count, Q

    from messaging.models import Message

    counts = Message.objects.filter(category=CAMPAIGN).aggregate(
        done=Count("id", filter=Q(state__in=DONE_STATES)), failed=Count("id", filter=Q(state__in=FAILED_STATES))
    )
    return counts["done"], counts["failed"]


def verify_once(stack, verify: str, message_count: int) -> tuple[str, float, int, int, int]:
    """(method, seconds, sent exactly once, sent more than once, never sent) over the campaign."""
    import requests
    from django.db.models import Count, Q

    from messaging.models import Message

    started = time.monotonic()
    ids = {str(i) for i in Message.objects.filter(category=CAMPAIGN).values_list("id", flat=True)}
    counts: dict[str, int] = {}
    method = "database"
    if verify in ("auto", "sandbox"):
        try:
            response = requests.get(
                f"{stack.sandbox_url}/_sandbox/requests",
                params={"provider": "twilio", "accepted": "true"},
                timeout=SANDBOX_LOG_MAX_S,
            )
            response.raise_for_status()
            for row in response.json()["requests"]:
                if row["message_id"] in ids:
                    counts[row["message_id"]] = counts.get(row["message_id"], 0) + 1
            method = "sandbox request log"
        except requests.RequestException as exc:
            if verify == "sandbox":
                raise
            print(f"  the sandbox's request log did not come ({exc!r}); counting in the database", flush=True)
            counts = {}
    if method == "database":
        rows = (
            Message.objects.filter(category=CAMPAIGN)
            .annotate(sends=Count("attempts", filter=Q(attempts__outcome="accepted")))
            .values_list("id", "sends")
        )
        counts = {str(i): n for i, n in rows if n}
        method = "database (DispatchAttempt outcome=accepted)"
    once = sum(1 for i in ids if counts.get(i) == 1)
    more = sum(1 for i in ids if counts.get(i, 0) > 1)
    never = sum(1 for i in ids if counts.get(i, 0) == 0)
    if len(ids) != message_count:
        print(f"  warning: {len(ids)} campaign messages in the database, {message_count} posted", flush=True)
    return method, time.monotonic() - started, once, more, never


def measure(key: str, opts: Options, label: str = "bulk") -> Result:
    """One full run on a new stack (started and stopped here). The database must be fresh/empty."""
    from django.db.models import Max, Min

    from messaging.models import Message

    result = Result(options=asdict(opts))
    began = time.monotonic()
    stack = production_stack(DATABASE)
    sender: CriticalSender | None = None
    try:
        stack.start(workers=0)
        stack.sandbox_reset()
        stack.sandbox_faults(provider="twilio", latency_ms=50, receipt_loss_rate=1.0, callback_mode="final_only")
        print(
            f"[{label}] stack up (logs {stack.log_dir}); sandbox Twilio 50 ms per send, receipts off "
            "(final_only callbacks, receipt_loss_rate 1.0: no callbacks to the web)",
            flush=True,
        )
        print(f"[{label}] ingesting {opts.messages:,} bulk SMS, {opts.clients} clients x 1,000 per batch", flush=True)
        ingest = post_batches(stack, key, sms_campaign(opts.messages, CAMPAIGN), opts.clients, label=f"{label} ingest")
        result.ingest_rate, result.ingest_s = ingest.rate, ingest.elapsed_s
        print(f"[{label}] ingested in {ingest.elapsed_s:.1f} s ({ingest.rate:,.0f} msg/s)", flush=True)

        print(
            f"[{label}] baseline: {opts.baseline_tasks:,} raw Celery no-op tasks, "
            f"{opts.bulk_workers} worker(s) x -c {opts.concurrency}, same broker",
            flush=True,
        )
        baseline = noop_baseline(stack, opts.baseline_tasks, opts.bulk_workers, opts.concurrency)
        result.baseline = asdict(baseline)
        print(f"[{label}] baseline: {baseline.describe()}, worker RSS {baseline.rss_mb:.0f} MB", flush=True)

        start_queue_worker(stack, "urgent", URGENT_QUEUES, opts.urgent_concurrency)
        start_queue_worker(stack, "maintenance", MAINTENANCE_QUEUES, 1)
        bulk, ready_at = [], None
        for n in range(opts.bulk_workers):
            worker, ready = start_queue_worker(stack, f"bulk{n + 1}", BULK_QUEUES, opts.concurrency, nice=BULK_NICE)
            bulk.append(worker)
            ready_at = ready_at or ready
        rss = {"start": sum(rss_mb(w.pid) for w in bulk)}
        peak = rss["start"]
        sender = CriticalSender(stack, key, opts.critical_rate)
        sender.start()
        print(f"[{label}] bulk worker(s) ready; draining, critical SMS at ~{opts.critical_rate:g}/s", flush=True)

        reported, last_done, last_move = 0, -1, time.monotonic()
        while True:
            done, failed = campaign_counts()
            now = time.monotonic()
            current = sum(rss_mb(w.pid) for w in bulk)
            peak = max(peak, current)
            if "middle" not in rss and done >= opts.messages / 2:
                rss["middle"] = current
            tenth = done * 10 // opts.messages
            if tenth > reported:
                reported = tenth
                print(
                    f"  [{label}] {done * 100 // opts.messages} % dispatched ({done:,}), "
                    f"{time.time() - ready_at:.0f} s since ready, bulk RSS {current:.0f} MB",
                    flush=True,
                )
            if done + failed >= opts.messages:
                break
            if done != last_done:
                last_done, last_move = done, now
            elif now - last_move > opts.stall_s:
                raise RuntimeError(f"no progress for {opts.stall_s:.0f} s at {done:,}/{opts.messages:,}")
            if not all(w.alive() for w in bulk):
                raise RuntimeError("a bulk worker exited")
            time.sleep(1.0)
        rss["end"] = sum(rss_mb(w.pid) for w in bulk)
        rss.setdefault("middle", rss["end"])
        rss["peak"] = max(peak, rss["end"])
        result.rss_mb = rss
        cpu = sum(cpu_s(w.pid) for w in bulk)
        result.cpu_ms_per_message = 1000 * cpu / opts.messages
        result.failed = failed
        sender.stopping.set()
        sender.join(35)

        span = Message.objects.filter(category=CAMPAIGN).aggregate(
            first=Min("dispatched_at"), last=Max("dispatched_at")
        )
        first, last = span["first"], span["last"]
        result.drain_s = (last - first).total_seconds()
        result.throughput_dispatch = done / result.drain_s if result.drain_s > 0 else 0.0
        ready_dt = datetime.fromtimestamp(ready_at, UTC)
        result.throughput_ready = done / (last - ready_dt).total_seconds()
        print(
            f"[{label}] drained: {done:,} dispatched, {failed} failed; {result.drain_s:.1f} s first -> last dispatch",
            flush=True,
        )

        # Critical messages: let the last ones go out, then read their timestamps.
        critical = Message.objects.filter(id__in=sender.ids)
        try:
            wait_for(lambda: critical.filter(state__in=DONE_STATES).count() >= len(sender.ids), 60, "critical SMS")
        except TimeoutError as exc:
            print(f"  [{label}] {exc}", flush=True)
        result.critical_sent = len(sender.ids)
        result.critical_dispatched, result.critical_ms = critical_latency_ms(sender.ids)
        if sender.errors:
            print(f"  [{label}] {len(sender.errors)} critical posts failed, e.g. {sender.errors[0]}", flush=True)

        print(f"[{label}] checking every message was sent exactly once ...", flush=True)
        method, seconds, once, more, never = verify_once(stack, opts.verify, opts.messages)
        result.verified_by, result.verify_s = method, seconds
        result.dispatched_once, result.duplicates, result.missing = once, more, never
        print(f"[{label}] {method} ({seconds:.1f} s): {once:,} once, {more} more than once, {never} never", flush=True)

        # The baseline moves by half between runs on a shared host (468-990 tasks/s in one day):
        # measured again after the drain (the stack's workers idle), the ratio is against the higher.
        after = noop_baseline(stack, opts.baseline_tasks, opts.bulk_workers, opts.concurrency)
        result.baseline_after = asdict(after)
        print(f"[{label}] baseline after the drain: {after.describe()}", flush=True)
    except BaseException:
        print(f"[{label}] failed; the last lines of each process's log:\n{stack.logs()[-8000:]}", flush=True)
        raise
    finally:
        if sender is not None:
            sender.stopping.set()
        stop_stack(stack)
    result.elapsed_s = time.monotonic() - began
    return result


def ratio_verdict(ratio: float, target: float, floor: float) -> str:
    return "PASS" if ratio >= target else "FLOOR" if ratio >= floor else "FAIL"


def baseline_rate(result: Result) -> float:
    """The higher of the no-op rates measured before and after the drain (before alone in old runs)."""
    return max(result.baseline["rate"], result.baseline_after.get("rate", 0.0))


def baseline_described(result: Result) -> str:
    base = Baseline(**result.baseline)
    if not result.baseline_after:
        return base.describe()
    return (
        f"{baseline_rate(result):,.0f} tasks/s raw Celery no-op, the higher of {base.rate:,.0f} before and "
        f"{result.baseline_after['rate']:,.0f} after the drain ({base.workers} worker x -c {base.concurrency})"
    )


def figures(result: Result, benchmark: str | None = None) -> list[Figure]:
    opts = Options(**result.options)
    base = Baseline(**result.baseline)
    rate = baseline_rate(result)
    name = benchmark or f"(a) bulk e2e, {opts.messages:,} msgs"
    critical_name = benchmark or f"(c) critical during a {opts.messages:,}-msg drain"
    memory_name = benchmark or f"(d) worker RSS, {opts.messages:,} msgs"
    workers = f"{opts.bulk_workers} bulk worker x -c {opts.concurrency}"
    ratio = result.throughput_dispatch / rate
    ratio_ready = result.throughput_ready / rate
    crit = result.critical_ms
    rss = result.rss_mb
    growth = (rss["end"] - rss["middle"]) / rss["middle"] * 100 if rss.get("middle") else float("nan")
    big = opts.messages >= 200_000
    exact = result.dispatched_once == opts.messages and not result.duplicates and not result.missing
    return [
        Figure(
            name,
            f"throughput, first -> last dispatch ({workers})",
            f"{result.throughput_dispatch:,.0f} msg/s",
            baseline_described(result),
            f"{ratio:.2f}x (target >= 2x, floor 1x)",
            ratio_verdict(ratio, 2.0, 1.0),
        ),
        Figure(
            name,
            "throughput, bulk worker ready -> last dispatch",
            f"{result.throughput_ready:,.0f} msg/s",
            baseline_described(result),
            f"{ratio_ready:.2f}x",
            "info",
        ),
        Figure(
            critical_name,
            f"critical accepted -> dispatched p50 / p95 / p99 ({result.critical_dispatched} of "
            f"{result.critical_sent} at ~{opts.critical_rate:g}/s during the drain)",
            f"{crit['p50']:.0f} / {crit['p95']:.0f} / {crit['p99']:.0f} ms",
            "-",
            "p99 < 1,000 ms" + ("" if big else " (target is for 200k)"),
            ("PASS" if crit["p99"] < 1000 else "FAIL") if result.critical_dispatched else "FAIL (none dispatched)",
        ),
        Figure(
            memory_name,
            "bulk worker RSS (main + pool) start / middle / end (peak)",
            f"{rss['start']:.0f} / {rss['middle']:.0f} / {rss['end']:.0f} ({rss['peak']:.0f}) MB",
            f"no-op worker {base.rss_mb:.0f} MB after {base.tasks:,} tasks",
            f"end vs middle {growth:+.1f} % (target within 10 %)",
            "PASS" if abs(growth) <= 10 else "FAIL",
        ),
        Figure(
            name,
            "bulk worker CPU per message (main + pool, user+sys)",
            f"{result.cpu_ms_per_message:.2f} ms",
            f"{1000 * opts.concurrency / rate:.2f} ms per no-op task (-c / rate, upper bound)",
            "-",
            "info",
        ),
        Figure(
            name,
            f"sent exactly once ({result.verified_by})",
            f"{result.dispatched_once:,} / {opts.messages:,}",
            "-",
            f"{result.duplicates} duplicated, {result.missing} never sent, {result.failed} failed",
            "PASS" if exact else "FAIL",
        ),
    ]


def add_arguments(parser: argparse.ArgumentParser, messages_default: int | None = 50_000) -> None:
    defaults = Options()
    if messages_default is not None:
        parser.add_argument(
            "--messages", type=int, default=messages_default, help="campaign size (default %(default)s)"
        )
    parser.add_argument("--bulk-workers", type=int, default=defaults.bulk_workers, help="bulk workers (default 1)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="processes per bulk worker, -c (default 4, as the Procfile)",
    )
    parser.add_argument("--urgent-concurrency", type=int, default=defaults.urgent_concurrency, help="default 2")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="ingest client threads (default 8)")
    parser.add_argument(
        "--critical-rate", type=float, default=defaults.critical_rate, help="critical SMS per second (default 5)"
    )
    parser.add_argument(
        "--baseline-tasks", type=int, default=defaults.baseline_tasks, help="no-op tasks (default 20000)"
    )
    parser.add_argument(
        "--verify",
        choices=("auto", "sandbox", "database"),
        default="auto",
        help="exactly-once check: the sandbox's request log, DispatchAttempt rows, or auto (the log, "
        f"the database if the log takes over {SANDBOX_LOG_MAX_S} s)",
    )
    parser.add_argument(
        "--stall", type=float, default=defaults.stall_s, help="give up after this many s without progress"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures and raw numbers as JSON")
    parser.add_argument(
        "--database",
        default=DATABASE,
        help="the bench's own database, dropped and created again (default %(default)s; another name "
        "when someone else may be running this bench on the same PostgreSQL)",
    )


def options_from(args: argparse.Namespace, messages: int) -> Options:
    return Options(
        messages=messages,
        bulk_workers=args.bulk_workers,
        concurrency=args.concurrency,
        urgent_concurrency=args.urgent_concurrency,
        clients=args.clients,
        critical_rate=args.critical_rate,
        baseline_tasks=args.baseline_tasks,
        verify=args.verify,
        stall_s=args.stall,
    )


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args()
    opts = options_from(args, args.messages)
    global DATABASE
    DATABASE = args.database
    key = fresh_database(DATABASE)
    result = measure(key, opts)
    figs = figures(result)
    print(
        f"\nBulk campaign of {opts.messages:,} SMS: ingest {result.ingest_rate:,.0f} msg/s ({opts.clients} clients), "
        f"drain {result.drain_s:.1f} s, whole run {result.elapsed_s:.0f} s. Sandbox 50 ms, receipts off."
    )
    print_figures(figs)
    write_json(args.json, figs, {"bulk": asdict(result)})


if __name__ == "__main__":
    main()
