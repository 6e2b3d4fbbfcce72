"""A message's whole life at campaign scale: POST -> dispatched -> delivered, receipts on.

Issue 19's headline, on the real stack at production timings (bench/_support.py), in its own
database (conductor_bench_lifecycle, dropped and created again):

 1. start the private Redis, the sandbox (Twilio at 50 ms per send, calling back as Twilio does:
    `sent`, then `delivered`, each signed, retried as documented: docs/sandbox.md), gunicorn as
    the Procfile (2 processes x 32 threads: the API), the receipt intake (`manage.py
    receipt_intake`, where the callbacks go) and beat;
 2. baseline: raw Celery no-op tasks/s on the same broker with the bulk worker's count, pool and
    concurrency (bench/noop_app.py), measured again after the run; the ratio is against the higher;
 3. start the workers as the Procfile: urgent (-c 2), maintenance (-c 1), receipts (-c 1), bulk
    (-c 4); a critical SMS is posted about --critical-rate times a second throughout;
 4. post the campaign (--messages bulk SMS to distinct numbers) through POST
    /api/v1/messages/batch/ from --clients threads, 1,000 per request, *while* the workers drain;
 5. wait until every campaign message is `delivered` (or nothing moved for --stall s), then until
    the sandbox has no callback pending and no receipt is left unapplied.

Reported: throughput from the first POST to the last `delivered` against the no-op baseline
(target >= 2x, floor 1x); receipts the sandbox posted (and gave up on) against receipts stored and
applied (target: every one); webhook latency p50/p95/p99 as the sandbox measured each callback;
campaign messages not `delivered` after the drain (target 0); critical accepted -> dispatched p99
during it (target < 1 s).

--callbacks (issue 21): the bench client's endpoint takes a status callback for every event of every
message, at a receiver process verifying each signature; reported: written / delivered / received
and how late. Compare with a run without it (the callbacks worker runs in both).

Run: .venv/bin/python bench/lifecycle.py [--messages 200000] [--callbacks] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from _support import (
    BULK_NICE,
    BULK_QUEUES,
    MAINTENANCE_QUEUES,
    URGENT_QUEUES,
    Baseline,
    Figure,
    fresh_database,
    noop_baseline,
    percentile,
    post_batches,
    print_figures,
    production_stack,
    sms_campaign,
    start_queue_worker,
    stop_on_sigterm,
    stop_stack,
    wait_for,
    write_json,
)
from bulk_throughput import CriticalSender, critical_latency_ms, ratio_verdict

DATABASE = "conductor_bench_lifecycle"
CAMPAIGN = "bench-lifecycle"
RECEIPTS_QUEUES = "receipts"
CALLBACKS_QUEUES = "callbacks"


@dataclass
class Options:
    messages: int = 200_000
    concurrency: int = 4  # as the Procfile's worker_bulk
    urgent_concurrency: int = 2
    clients: int = 8
    critical_rate: float = 5.0
    baseline_tasks: int = 20_000
    stall_s: float = 300.0
    # Issue 21: the bench client's endpoint takes a status callback for every event of every
    # message (a receiver process verifying each signature); off: no endpoint (the callbacks worker
    # runs either way, as in the Procfile).
    callbacks: bool = False


@dataclass
class Result:
    options: dict[str, Any]
    baseline: dict[str, Any] = field(default_factory=dict)
    baseline_after: dict[str, Any] = field(default_factory=dict)
    ingest_s: float = 0.0
    ingest_rate: float = 0.0
    lifecycle_s: float = 0.0  # first POST -> last delivered_at
    throughput: float = 0.0
    delivered: int = 0
    not_delivered: dict[str, int] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)  # the sandbox's counters
    receipts_stored: int = 0
    receipts_processed: int = 0
    receipts_moved: int = 0
    receipts_unmatched: int = 0
    receipts_rate: float = 0.0  # stored per second, first -> last received_at
    webhook_ms: dict[str, float] = field(default_factory=dict)
    critical_sent: int = 0
    critical_dispatched: int = 0
    critical_ms: dict[str, float] = field(default_factory=dict)
    elapsed_s: float = 0.0
    client_callbacks: dict[str, Any] = field(default_factory=dict)


def campaign_states() -> dict[str, int]:
    from django.db.models import Count

    from messaging.models import Message

    rows = Message.objects.filter(category=CAMPAIGN).values("state").annotate(n=Count("id")).order_by()
    return {row["state"]: row["n"] for row in rows}


def receipt_counts() -> dict[str, int]:
    from django.db.models import Count, Q

    from messaging.models import Receipt

    return Receipt.objects.aggregate(
        stored=Count("id"),
        processed=Count("id", filter=Q(processed_at__isnull=False)),
        moved=Count("id", filter=Q(applied=True)),
        unmatched=Count("id", filter=~Q(unmatched_reason="")),
    )


def measure(key: str, opts: Options) -> Result:
    from django.db.models import Max, Min

    from messaging.models import Message, Receipt

    result = Result(options=asdict(opts))
    began = time.monotonic()
    stack = production_stack(DATABASE)
    sender: CriticalSender | None = None
    receiver = None
    try:
        stack.start(workers=0)
        stack.sandbox_reset()
        stack.sandbox_faults(provider="twilio", latency_ms=50)
        print(f"stack up (logs {stack.log_dir}); sandbox Twilio 50 ms per send, callbacks as Twilio's", flush=True)
        baseline = noop_baseline(stack, opts.baseline_tasks, 1, opts.concurrency)
        result.baseline = asdict(baseline)
        print(f"baseline: {baseline.describe()}", flush=True)

        start_queue_worker(stack, "urgent", URGENT_QUEUES, opts.urgent_concurrency)
        start_queue_worker(stack, "maintenance", MAINTENANCE_QUEUES, 1)
        start_queue_worker(stack, "receipts", RECEIPTS_QUEUES, 1)
        start_queue_worker(stack, "callbacks", CALLBACKS_QUEUES, 2)  # as the Procfile's worker_callbacks
        if opts.callbacks:
            receiver = client_endpoint(stack)
        bulk, _ = start_queue_worker(stack, "bulk1", BULK_QUEUES, opts.concurrency, nice=BULK_NICE)
        sender = CriticalSender(stack, key, opts.critical_rate)
        sender.start()
        print(
            f"workers up; posting {opts.messages:,} bulk SMS ({opts.clients} clients x 1,000 per batch) "
            f"while they drain, critical SMS at ~{opts.critical_rate:g}/s",
            flush=True,
        )
        ingest = post_batches(stack, key, sms_campaign(opts.messages, CAMPAIGN), opts.clients, label="post")
        result.ingest_s, result.ingest_rate = ingest.elapsed_s, ingest.rate
        print(f"posted in {ingest.elapsed_s:.1f} s ({ingest.rate:,.0f} msg/s)", flush=True)

        reported, last_delivered, last_move = 0, -1, time.monotonic()
        while True:
            states = campaign_states()
            delivered = states.get("delivered", 0)
            tenth = delivered * 10 // opts.messages
            if tenth > reported:
                reported = tenth
                print(
                    f"  {delivered * 100 // opts.messages} % delivered ({delivered:,}; "
                    f"{states.get('dispatched', 0):,} dispatched, {states.get('accepted', 0):,} accepted), "
                    f"{time.time() - ingest.first_request:.0f} s since the first POST",
                    flush=True,
                )
            if delivered >= opts.messages:
                break
            now = time.monotonic()
            if delivered != last_delivered:
                last_delivered, last_move = delivered, now
            elif now - last_move > opts.stall_s:
                print(f"  no progress for {opts.stall_s:.0f} s: {states}", flush=True)
                break
            if not bulk.alive():
                raise RuntimeError("the bulk worker exited")
            time.sleep(1.0)
        sender.stopping.set()
        sender.join(35)

        # Every callback the sandbox still holds goes out, and every stored receipt is applied.
        try:
            wait_for(lambda: stack.sandbox_callback_summary()["total"]["pending"] == 0, 120, "sandbox callbacks")
            wait_for(lambda: not Receipt.objects.filter(processed_at__isnull=True).exists(), 120, "receipts applied")
        except TimeoutError as exc:
            print(f"  {exc}", flush=True)
        states = campaign_states()
        result.delivered = states.get("delivered", 0)
        result.not_delivered = {state: n for state, n in states.items() if state != "delivered"}
        span = Message.objects.filter(category=CAMPAIGN).aggregate(last=Max("delivered_at"))
        first_post = datetime.fromtimestamp(ingest.first_request, UTC)
        result.lifecycle_s = (span["last"] - first_post).total_seconds() if span["last"] else float("nan")
        result.throughput = result.delivered / result.lifecycle_s if result.lifecycle_s > 0 else 0.0

        summary = stack.sandbox_callback_summary()
        result.callbacks = summary
        counts = receipt_counts()
        result.receipts_stored, result.receipts_processed = counts["stored"], counts["processed"]
        result.receipts_moved, result.receipts_unmatched = counts["moved"], counts["unmatched"]
        received = Receipt.objects.aggregate(first=Min("received_at"), last=Max("received_at"))
        if received["first"] and received["last"] > received["first"]:
            result.receipts_rate = counts["stored"] / (received["last"] - received["first"]).total_seconds()
        result.webhook_ms = summary.get("latency_ms", {})

        if receiver is not None:
            result.client_callbacks = client_callback_figures(receiver, ingest.first_request)
            print(f"client callbacks: {result.client_callbacks}", flush=True)
        result.critical_sent = len(sender.ids)
        result.critical_dispatched, result.critical_ms = critical_latency_ms(sender.ids)
        after = noop_baseline(stack, opts.baseline_tasks, 1, opts.concurrency)
        result.baseline_after = asdict(after)
        print(f"baseline after the run: {after.describe()}", flush=True)
    except BaseException:
        print(f"failed; the last lines of each process's log:\n{stack.logs()[-8000:]}", flush=True)
        raise
    finally:
        if sender is not None:
            sender.stopping.set()
        if receiver is not None:
            receiver.stop()
        stop_stack(stack)
    result.elapsed_s = time.monotonic() - began
    return result


def client_endpoint(stack):
    """The bench client's callback endpoint (every event) at a receiver process of its own."""
    from messaging.callbacks.signing import new_secret
    from messaging.models import ApiClient, CallbackEndpoint
    from tests.support.callback_receiver import ReceiverProcess

    secret = new_secret()
    receiver = ReceiverProcess(secrets=[secret], log_dir=stack.log_dir).start()
    CallbackEndpoint.objects.create(
        client=ApiClient.objects.get(name="bench"),
        url=receiver.url(),
        secrets=[{"secret": secret, "created_at": datetime.now(UTC).isoformat(), "expires_at": None}],
    )
    print(f"client callbacks on: every event to {receiver.url()}", flush=True)
    return receiver


def client_callback_figures(receiver, first_post: float) -> dict[str, Any]:
    """Wait for every callback to be delivered; what was written, delivered, received, and how late."""
    from django.db.models import Count, Max

    from messaging.models import Callback

    try:
        wait_for(lambda: not Callback.objects.filter(state="pending").exists(), 600, "client callbacks delivered")
    except TimeoutError as exc:
        print(f"  {exc}", flush=True)
    counts = dict(Callback.objects.values_list("state").annotate(n=Count("id")))
    lags = sorted(
        (delivered - occurred).total_seconds()
        for occurred, delivered in Callback.objects.filter(state="delivered").values_list("occurred_at", "delivered_at")
    )
    last = Callback.objects.aggregate(last=Max("delivered_at"))["last"]
    summary = receiver.summary()
    return {
        "written": sum(counts.values()),
        "states": counts,
        "received_distinct": summary["distinct_webhook_ids"],
        "requests": summary["requests"],
        "unverified": summary["unverified"],
        "lag_p50_s": percentile(lags, 0.5) if lags else float("nan"),
        "lag_p99_s": percentile(lags, 0.99) if lags else float("nan"),
        "last_delivered_s": (last.timestamp() - first_post) if last else float("nan"),
    }


def figures(result: Result) -> list[Figure]:
    opts = Options(**result.options)
    name = f"lifecycle, {opts.messages:,} SMS, receipts on" + (", client callbacks on" if opts.callbacks else "")
    rate = max(result.baseline["rate"], result.baseline_after.get("rate", 0.0))
    base = Baseline(**result.baseline)
    baseline = (
        f"{rate:,.0f} tasks/s raw Celery no-op, the higher of {base.rate:,.0f} before and "
        f"{result.baseline_after.get('rate', 0.0):,.0f} after (1 worker x -c {opts.concurrency})"
    )
    ratio = result.throughput / rate if rate else 0.0
    callbacks = result.callbacks.get("total", {})
    posted, given_up = callbacks.get("posted_ok", 0), callbacks.get("given_up", 0)
    every_receipt = posted == result.receipts_stored == result.receipts_processed and not given_up
    web = result.webhook_ms
    crit = result.critical_ms
    missing = sum(result.not_delivered.values())
    client = result.client_callbacks
    callback_rows = (
        [
            Figure(
                name,
                "client callbacks written / delivered / received (distinct webhook-ids; requests)",
                f"{client['written']:,} / {client['states'].get('delivered', 0):,} / "
                f"{client['received_distinct']:,} ({client['requests']:,})",
                f"event -> delivered p50 {client['lag_p50_s']:.1f} s, p99 {client['lag_p99_s']:.1f} s; "
                f"last {client['last_delivered_s']:.0f} s after the first POST",
                "every one, signed",
                "PASS"
                if client["written"] == client["states"].get("delivered", 0) == client["received_distinct"]
                and not client["unverified"]
                else "FAIL",
            )
        ]
        if client
        else []
    )
    return [
        *callback_rows,
        Figure(
            name,
            f"throughput, first POST -> last delivered ({opts.clients} clients posting while 1 bulk worker "
            f"x -c {opts.concurrency} drains)",
            f"{result.throughput:,.0f} msg/s",
            baseline,
            f"{ratio:.2f}x (target >= 2x, floor 1x)",
            ratio_verdict(ratio, 2.0, 1.0),
        ),
        Figure(
            name,
            "receipts posted by the sandbox / stored / applied (given up by the sandbox)",
            f"{posted:,} / {result.receipts_stored:,} / {result.receipts_processed:,} ({given_up} given up)",
            f"{callbacks.get('scheduled', 0):,} callbacks scheduled",
            f"every one; {result.receipts_moved:,} moved a message, {result.receipts_unmatched} unmatched",
            "PASS" if every_receipt else "FAIL",
        ),
        Figure(
            name,
            "webhook latency p50 / p95 / p99, as the sandbox timed each callback",
            f"{web.get('p50', float('nan')):.0f} / {web.get('p95', float('nan')):.0f} / "
            f"{web.get('p99', float('nan')):.0f} ms",
            f"{result.receipts_rate:,.0f} receipts/s stored (first -> last)",
            "p99 < 50 ms",
            "PASS" if web.get("p99", float("inf")) < 50 else "FAIL",
        ),
        Figure(
            name,
            "campaign messages not delivered after the drain",
            f"{missing:,}" + (f" {result.not_delivered}" if missing else ""),
            "-",
            "0",
            "PASS" if missing == 0 and result.delivered == opts.messages else "FAIL",
        ),
        Figure(
            name,
            f"critical accepted -> dispatched p50 / p95 / p99 ({result.critical_dispatched} of "
            f"{result.critical_sent} at ~{opts.critical_rate:g}/s during it)",
            f"{crit['p50']:.0f} / {crit['p95']:.0f} / {crit['p99']:.0f} ms",
            "-",
            "p99 < 1,000 ms",
            ("PASS" if crit["p99"] < 1000 else "FAIL") if result.critical_dispatched else "FAIL (none dispatched)",
        ),
    ]


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Options()
    parser.add_argument("--messages", type=int, default=defaults.messages, help="campaign size (default %(default)s)")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="posting client threads (default 8)")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="bulk worker -c (default 4)")
    parser.add_argument("--critical-rate", type=float, default=defaults.critical_rate, help="default 5 a second")
    parser.add_argument("--baseline-tasks", type=int, default=defaults.baseline_tasks, help="default 20000")
    parser.add_argument("--stall", type=float, default=defaults.stall_s, help="give up after this many s still")
    parser.add_argument("--callbacks", action="store_true", help="a client callback for every event (issue 21)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures and raw numbers as JSON")
    args = parser.parse_args()
    opts = Options(
        messages=args.messages,
        concurrency=args.concurrency,
        clients=args.clients,
        critical_rate=args.critical_rate,
        baseline_tasks=args.baseline_tasks,
        stall_s=args.stall,
        callbacks=args.callbacks,
    )
    key = fresh_database(DATABASE)
    result = measure(key, opts)
    print(
        f"\n{opts.messages:,} bulk SMS posted by {opts.clients} clients while the workers drained: "
        f"{result.lifecycle_s:.1f} s first POST -> last delivered, whole run {result.elapsed_s:.0f} s."
    )
    print_figures(figures(result))
    write_json(args.json, figures(result), {"lifecycle": asdict(result)})


if __name__ == "__main__":
    main()
