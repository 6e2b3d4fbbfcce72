"""Redis against RabbitMQ as Conductor's broker: bulk throughput and transactional latency.

For each broker in turn (--brokers, default redis then rabbitmq), on the real stack at production
timings (bench/_support.py) in its own database (conductor_bench_brokers, dropped and created
again each time), with a broker of the stack's own (a private redis-server, or a private RabbitMQ
node with quorum queues and publisher confirms, as conductor_project/settings/base.py configures
an amqp:// broker); Redis holds circuits and rate limits in both:

 1. the sandbox answers Twilio in 50 ms, receipts off (as bulk_throughput.py);
 2. ingest --messages bulk SMS through POST /api/v1/messages/batch/ (1,000 per request, --clients
    threads), no workers yet: their tasks wait in the broker;
 3. start the Procfile's split: an urgent worker (critical/transactional queues, -c 2), a
    maintenance worker (-c 1) and a bulk worker (-c 4, nice 10); while the campaign drains, post
    a transactional SMS about --rate times a second, one per POST /api/v1/messages/;
 4. bulk throughput = campaign messages / (first -> last dispatched_at); transactional accepted ->
    dispatched p50/p95/p99 during the drain;
 5. the campaign drained, --idle more transactional SMS at the same rate: their accepted ->
    dispatched and the POST's round trip (which includes publishing the task: with confirms on
    RabbitMQ, until the quorum queue has it on disk) p50/p99;
 6. a burst of --burst transactional SMS through the batch API (one task each, published one by
    one: what the broker's per-task cost, publisher confirms included, shows in): ingest msg/s
    and the urgent worker's msg/s, first -> last dispatched_at;
 7. every campaign and burst message accepted once by the sandbox (its request log).

Run: .venv/bin/python bench/broker_compare.py [--messages 20000] [--rate 5] [--idle 100] [--burst 2000]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from _support import (
    BULK_NICE,
    BULK_QUEUES,
    DONE_STATES,
    MAINTENANCE_QUEUES,
    URGENT_QUEUES,
    Figure,
    fresh_database,
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
from bulk_throughput import CriticalSender, critical_latency_ms

DATABASE = "conductor_bench_brokers"
CAMPAIGN = "bench-campaign"
BURST = "bench-burst"
BROKERS = ("redis", "rabbitmq")


@dataclass
class Result:
    broker: str
    ingest_rate: float = 0.0
    drain_s: float = 0.0
    throughput: float = 0.0
    during_ms: dict[str, float] = field(default_factory=dict)
    during_count: int = 0
    idle_ms: dict[str, float] = field(default_factory=dict)
    idle_post_ms: dict[str, float] = field(default_factory=dict)
    idle_count: int = 0
    burst_ingest_rate: float = 0.0
    burst_throughput: float = 0.0
    accepted_once: int = 0
    accepted_twice: int = 0
    never: int = 0
    elapsed_s: float = 0.0


def campaign_done() -> int:
    from messaging.models import Message

    return Message.objects.filter(category=CAMPAIGN, state__in=DONE_STATES).count()


def send_for(stack, key: str, rate: float, until: Callable[[CriticalSender], bool]) -> CriticalSender:
    """Transactional SMS at `rate`/s until `until(sender)` is true; returns the stopped sender
    once all it sent are dispatched."""
    sender = CriticalSender(stack, key, rate, priority="transactional")
    sender.start()
    try:
        while not until(sender):
            time.sleep(0.5)
    finally:
        sender.stopping.set()
        sender.join(35)
    wait_for(lambda: _dispatched(sender.ids) >= len(sender.ids), 60, "the transactional SMS dispatched")
    return sender


def _dispatched(ids: list[str]) -> int:
    from messaging.models import Message

    return Message.objects.filter(id__in=ids, state__in=DONE_STATES).count()


def measure(broker: str, database: str, messages: int, rate: float, idle: int, burst: int, clients: int) -> Result:
    result = Result(broker=broker)
    began = time.monotonic()
    key = fresh_database(database)  # sets Django up: models only after it
    from django.db.models import Max, Min

    from messaging.models import Message

    stack = production_stack(database, broker=broker)
    try:
        stack.start(workers=0)
        stack.sandbox_reset()
        stack.sandbox_faults(provider="twilio", latency_ms=50, receipt_loss_rate=1.0, callback_mode="final_only")
        print(f"[{broker}] stack up (broker {stack.broker_url}, logs {stack.log_dir})", flush=True)
        ingest = post_batches(stack, key, sms_campaign(messages, CAMPAIGN), clients, label=f"{broker} ingest")
        result.ingest_rate = ingest.rate
        start_queue_worker(stack, "urgent", URGENT_QUEUES, 2)
        start_queue_worker(stack, "maintenance", MAINTENANCE_QUEUES, 1)
        start_queue_worker(stack, "bulk1", BULK_QUEUES, 4, nice=BULK_NICE)
        print(f"[{broker}] workers ready; draining {messages:,}, transactional SMS at ~{rate:g}/s", flush=True)
        during = send_for(stack, key, rate, lambda _: campaign_done() >= messages)
        campaign = Message.objects.filter(category=CAMPAIGN)
        span = campaign.aggregate(first=Min("dispatched_at"), last=Max("dispatched_at"))
        result.drain_s = (span["last"] - span["first"]).total_seconds()
        result.throughput = messages / result.drain_s if result.drain_s > 0 else 0.0
        result.during_count, result.during_ms = critical_latency_ms(during.ids)
        print(f"[{broker}] drained in {result.drain_s:.1f} s; {idle} transactional SMS on idle workers", flush=True)
        idle_sender = send_for(stack, key, rate, lambda sender: len(sender.ids) >= idle)
        result.idle_count, result.idle_ms = critical_latency_ms(idle_sender.ids)
        result.idle_post_ms = {f"p{p}": percentile(idle_sender.post_ms, p / 100) for p in (50, 99)}
        print(f"[{broker}] a burst of {burst:,} transactional SMS through the batch API", flush=True)
        items = [{**item, "priority": "transactional"} for item in sms_campaign(burst, BURST, offset=messages)]
        result.burst_ingest_rate = post_batches(stack, key, items, clients, label=f"{broker} burst").rate
        burst_messages = Message.objects.filter(category=BURST)
        wait_for(lambda: burst_messages.filter(state__in=DONE_STATES).count() >= burst, 600, "the burst dispatched")
        span = burst_messages.aggregate(first=Min("dispatched_at"), last=Max("dispatched_at"))
        burst_s = (span["last"] - span["first"]).total_seconds()
        result.burst_throughput = burst / burst_s if burst_s > 0 else 0.0
        accepted: dict[str, int] = {}
        for row in stack.sandbox_requests(provider="twilio", accepted="true"):
            accepted[row["message_id"]] = accepted.get(row["message_id"], 0) + 1
        ids = [str(i) for i in Message.objects.filter(category__in=[CAMPAIGN, BURST]).values_list("id", flat=True)]
        result.accepted_once = sum(1 for i in ids if accepted.get(i) == 1)
        result.accepted_twice = sum(1 for i in ids if accepted.get(i, 0) > 1)
        result.never = sum(1 for i in ids if i not in accepted)
    except BaseException:
        print(f"[{broker}] failed; the last lines of each process's log:\n{stack.logs()[-8000:]}", flush=True)
        raise
    finally:
        stop_stack(stack)
    result.elapsed_s = time.monotonic() - began
    return result


def figures(results: list[Result], messages: int, burst: int) -> list[Figure]:
    by = {r.broker: r for r in results}
    rows: list[Figure] = []
    for r in results:
        name = f"brokers ({r.broker})"
        rows += [
            Figure(name, f"bulk throughput, {messages:,} SMS (msg/s)", f"{r.throughput:,.0f}"),
            Figure(name, "ingest through the batch API (msg/s)", f"{r.ingest_rate:,.0f}"),
            Figure(
                name,
                f"transactional accepted -> dispatched during the drain, p50/p95/p99 ms ({r.during_count})",
                "/".join(f"{r.during_ms[p]:,.0f}" for p in ("p50", "p95", "p99")),
            ),
            Figure(
                name,
                f"transactional accepted -> dispatched, idle workers, p50/p95/p99 ms ({r.idle_count})",
                "/".join(f"{r.idle_ms[p]:,.0f}" for p in ("p50", "p95", "p99")),
            ),
            Figure(
                name,
                "POST /api/v1/messages/ round trip, idle, p50/p99 ms",
                "/".join(f"{r.idle_post_ms[p]:,.0f}" for p in ("p50", "p99")),
            ),
            Figure(
                name,
                f"transactional burst of {burst:,}: ingest through the batch API (msg/s)",
                f"{r.burst_ingest_rate:,.0f}",
            ),
            Figure(name, f"transactional burst of {burst:,}: urgent worker -c 2 (msg/s)", f"{r.burst_throughput:,.0f}"),
            Figure(
                name,
                "campaign and burst accepted by the provider once / twice / never",
                f"{r.accepted_once:,} / {r.accepted_twice} / {r.never}",
                verdict="PASS" if r.accepted_twice == r.never == 0 else "FAIL",
            ),
        ]
    if "redis" in by and "rabbitmq" in by and by["redis"].throughput:
        ratio = by["rabbitmq"].throughput / by["redis"].throughput
        rows.append(Figure("brokers", "bulk throughput, RabbitMQ / Redis", f"{ratio:.2f}x"))
    if "redis" in by and "rabbitmq" in by and by["redis"].burst_throughput:
        ratio = by["rabbitmq"].burst_throughput / by["redis"].burst_throughput
        rows.append(Figure("brokers", "transactional burst throughput, RabbitMQ / Redis", f"{ratio:.2f}x"))
    return rows


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="bulk campaign size (default %(default)s)")
    parser.add_argument("--rate", type=float, default=5.0, help="transactional SMS per second (default 5)")
    parser.add_argument("--idle", type=int, default=100, help="transactional SMS after the drain (default 100)")
    parser.add_argument("--burst", type=int, default=2000, help="transactional SMS in the burst (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="ingest client threads (default 8)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated, in order (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures and raw numbers as JSON")
    parser.add_argument("--database", default=DATABASE, help="its own database, dropped and created again")
    args = parser.parse_args()
    results = []
    for broker in args.brokers.split(","):
        results.append(measure(broker, args.database, args.messages, args.rate, args.idle, args.burst, args.clients))
    figs = figures(results, args.messages, args.burst)
    print(f"\nBrokers: {args.messages:,} bulk SMS (sandbox 50 ms, receipts off), transactional at {args.rate:g}/s.")
    print_figures(figs)
    write_json(args.json, figs, {"results": [asdict(r) for r in results]})


if __name__ == "__main__":
    main()
