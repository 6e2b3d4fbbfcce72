"""Ingest: bulk messages through the batch API into PostgreSQL (issue 9's (b)).

Starts the stack at production timings (bench/_support.py: private Redis, sandbox, gunicorn
with 2 processes x 8 threads, beat) with NO workers, in its own database (conductor_bench_ingest,
dropped and created again), and posts --messages bulk SMS to distinct numbers through POST
/api/v1/messages/batch/, --batch items per request, from --clients threads (each its own
connection, one request in flight at a time). The API stores each message and publishes its
task to the broker, which is part of what is timed; nothing consumes the tasks.

Figures: messages/s from the first request sent to the last response received, per-batch
latency p50/p95/max, and the rows found in PostgreSQL afterwards. Baseline, for scale: the same
rows written by Django's bulk_create straight into PostgreSQL from this process (one thread,
1,000 per INSERT, rolled back): how close the API comes to what the database alone takes.

Target (issue 9): >= 5,000 messages/s for 200,000 messages.

Run: .venv/bin/python bench/ingest.py [--messages 200000] [--clients 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

from _support import (
    Figure,
    fresh_database,
    percentile,
    post_batches,
    print_figures,
    production_stack,
    sms_campaign,
    stop_on_sigterm,
    stop_stack,
    write_json,
)

DATABASE = "conductor_bench_ingest"
CATEGORY = "bench-ingest"
TARGET = 5000.0


def bulk_create_rate(rows: int) -> float:
    """Rows/s for Message.objects.bulk_create of `rows` campaign-like rows, 1,000 per INSERT, rolled back."""
    from django.db import transaction
    from django.utils import timezone

    from messaging.models import ApiClient, Message

    client = ApiClient.objects.get(name="bench")
    now = timezone.now()
    items = sms_campaign(rows, "bench-baseline", offset=1_000_000)
    started = time.perf_counter()
    with transaction.atomic():
        Message.objects.bulk_create(
            [
                Message(
                    client=client,
                    channel=item["channel"],
                    to=item["to"],
                    body=item["body"],
                    priority=item["priority"],
                    category=item["category"],
                    created_at=now,
                    accepted_at=now,
                    expires_at=now + timedelta(hours=24),
                )
                for item in items
            ],
            batch_size=1000,
        )
        elapsed = time.perf_counter() - started
        transaction.set_rollback(True)
    return rows / elapsed


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="messages to post (default 200000)")
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per request (default 1000, the API's max)")
    parser.add_argument(
        "--baseline-rows", type=int, default=20_000, help="rows for the bulk_create baseline (default 20000; 0: skip)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures and raw numbers as JSON")
    args = parser.parse_args()

    key = fresh_database(DATABASE)
    from messaging.models import Message

    stack = production_stack(DATABASE)
    try:
        stack.start(workers=0)
        print(f"stack up (logs {stack.log_dir}); no workers: only ingest is timed", flush=True)
        items = sms_campaign(args.messages, CATEGORY)
        print(f"posting {args.messages:,} bulk SMS, {args.batch} per batch, {args.clients} client threads", flush=True)
        result = post_batches(stack, key, items, args.clients, args.batch)
    finally:
        stop_stack(stack)
    stored = Message.objects.filter(category=CATEGORY).count()
    latencies_ms = [s * 1000 for s in result.batch_latencies_s]
    p50, p95 = percentile(latencies_ms, 0.50), percentile(latencies_ms, 0.95)
    print(
        f"{result.created:,} created in {result.elapsed_s:.1f} s: {result.rate:,.0f} msg/s; "
        f"{stored:,} rows in PostgreSQL; per batch p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(latencies_ms):.0f} ms",
        flush=True,
    )
    baseline = None
    if args.baseline_rows:
        baseline = bulk_create_rate(args.baseline_rows)
        print(f"baseline: bulk_create of {args.baseline_rows:,} rows: {baseline:,.0f} rows/s", flush=True)

    name = f"(b) ingest, {args.messages:,} msgs"
    base_text = (
        f"{baseline:,.0f} rows/s bulk_create, 1 thread (API at {result.rate / baseline:.0%})" if baseline else "-"
    )
    figs = [
        Figure(
            name,
            f"batch API -> PostgreSQL, {args.clients} clients x {args.batch}/request",
            f"{result.rate:,.0f} msg/s",
            base_text,
            f"{result.rate / TARGET:.2f}x of target >= {TARGET:,.0f} msg/s",
            "PASS" if result.rate >= TARGET else "FAIL",
        ),
        Figure(name, "per-batch latency p50 / p95 / max", f"{p50:.0f} / {p95:.0f} / {max(latencies_ms):.0f} ms"),
        Figure(
            name,
            "rows stored",
            f"{stored:,} / {args.messages:,}",
            verdict="PASS" if stored == args.messages else "FAIL",
        ),
    ]
    print_figures(figs)
    write_json(
        args.json,
        figs,
        {
            "messages": args.messages,
            "clients": args.clients,
            "batch": args.batch,
            "created": result.created,
            "stored": stored,
            "elapsed_s": result.elapsed_s,
            "rate": result.rate,
            "batch_ms": {"p50": p50, "p95": p95, "max": max(latencies_ms)},
            "baseline_bulk_create_rate": baseline,
        },
    )


if __name__ == "__main__":
    main()
