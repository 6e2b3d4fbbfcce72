"""Bulk throughput with one worker host and with two (issue 25, "several hosts").

The machine becomes three hosts (tests/support/netns.py, needs root): a server network namespace
running Redis, a PostgreSQL of its own, the sandbox, web, receipt intake, beat and the maintenance
worker, at production timings (bench/_support.production_stack); two worker namespaces, each
running the Procfile's bulk worker (-c 4, nice 10); all linked by a bridge. For each step (one
worker host, then two):

 1. --messages bulk SMS to distinct numbers through POST /api/v1/messages/batch/ (sandbox Twilio at
    50 ms a send, receipts off as in bench/bulk_throughput.py); their tasks wait in the broker;
 2. the step's bulk workers, started beforehand on a queue nobody uses, are all told at the same
    moment to consume the bulk queues (Celery's add_consumer), so that no host starts early;
 3. once every message is dispatched: msg/s = messages / (last dispatched_at - first), each host's
    share of the sends (the sandbox's request log names the sending address), the bulk workers'
    CPU per message (user + sys of each worker tree, /proc), and that every message reached the
    sandbox exactly once.

Namespaces separate networks, not CPUs: both worker hosts share this machine's cores with the
server host and with whatever else runs here. What the ratio means is printed with the table.

Run (as root): .venv/bin/python bench/multi_host.py [--messages 5000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from _support import (
    BULK_NICE,
    BULK_QUEUES,
    MAINTENANCE_QUEUES,
    cpu_s,
    post_batches,
    production_stack,
    sms_campaign,
    start_queue_worker,
    stop_on_sigterm,
    stop_stack,
    wait_for,
)

DATABASE = "conductor_bench_hosts"
IDLE_QUEUE = "bench.idle"  # where a bulk worker waits until its step starts: nothing is published to it


@dataclass
class Step:
    hosts: int
    messages: int
    concurrency: int
    drain_s: float = 0.0
    rate: float = 0.0
    per_host: dict[str, int] = field(default_factory=dict)
    cpu_ms_per_message: float = 0.0
    once: int = 0
    more: int = 0
    never: int = 0


def measure(stack, hosts, key: str, count: int, opts: argparse.Namespace, offset: int) -> Step:
    """One step on the running server host: `count` worker hosts drain a campaign of their own."""
    from celery import current_app
    from django.db.models import Max, Min

    from messaging.models import Message

    step = Step(hosts=count, messages=opts.messages, concurrency=opts.concurrency)
    category = f"bench-hosts-{count}"
    stack.sandbox_reset()
    stack.sandbox_faults(provider="twilio", latency_ms=50, receipt_loss_rate=1.0, callback_mode="final_only")
    workers = []
    for n, host in enumerate(hosts.workers[:count], start=1):
        worker, _ = start_queue_worker(
            stack, f"bulk{count}h{n}", IDLE_QUEUE, opts.concurrency, nice=BULK_NICE, prefix=host.prefix
        )
        workers.append(worker)
    names = [f"bulk{count}h{n}@{os.uname().nodename}" for n in range(1, count + 1)]
    print(f"[{count} host(s)] ingesting {opts.messages:,} bulk SMS", flush=True)
    post_batches(stack, key, sms_campaign(opts.messages, category, offset=offset), clients=4, label="ingest")
    cpu_before = [cpu_s(worker.pid) for worker in workers]
    for queue in BULK_QUEUES.split(","):
        replies = current_app.control.add_consumer(queue, destination=names, reply=True, timeout=5)
        if len(replies) != count:
            raise RuntimeError(f"add_consumer {queue}: {replies} (wanted {names})")
    print(f"[{count} host(s)] draining on {', '.join(names)}", flush=True)
    campaign = Message.objects.filter(category=category)
    wait_for(
        lambda: campaign.filter(state="dispatched").count() == opts.messages,
        opts.timeout,
        f"{opts.messages:,} dispatched",
        interval_s=0.25,
    )
    cpu = sum(cpu_s(worker.pid) - before for worker, before in zip(workers, cpu_before, strict=True))
    span = campaign.aggregate(first=Min("dispatched_at"), last=Max("dispatched_at"))
    step.drain_s = (span["last"] - span["first"]).total_seconds()
    step.rate = opts.messages / step.drain_s if step.drain_s else 0.0
    step.cpu_ms_per_message = 1000 * cpu / opts.messages

    ids = {str(pk) for pk in campaign.values_list("pk", flat=True)}
    host_of = {host.address: f"host {n}" for n, host in enumerate(hosts.workers, start=1)}
    sent = [r for r in stack.sandbox_requests(provider="twilio", accepted="true") if r["message_id"] in ids]
    per_message = Counter(r["message_id"] for r in sent)
    step.once = sum(1 for i in ids if per_message[i] == 1)
    step.more = sum(1 for i in ids if per_message[i] > 1)
    step.never = sum(1 for i in ids if per_message[i] == 0)
    step.per_host = dict(sorted(Counter(host_of.get(r["remote"], r["remote"]) for r in sent).items()))
    for worker in workers:  # the next step starts its own
        worker.stop()
        stack.workers.remove(worker)
    print(
        f"[{count} host(s)] {step.rate:,.0f} msg/s over {step.drain_s:.1f} s, sends per host {step.per_host}, "
        f"{step.cpu_ms_per_message:.2f} CPU ms/msg; {step.once:,} sent once, {step.more} twice or more, "
        f"{step.never} never",
        flush=True,
    )
    return step


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=5000, help="campaign size per step (default 5000)")
    parser.add_argument("--concurrency", type=int, default=4, help="processes per bulk worker (default 4, Procfile)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a drain may take (default 600)")
    opts = parser.parse_args()
    from tests.support.netns import Hosts, ScratchPostgres, hosts_available  # after _support set sys.path

    reason = hosts_available()
    if reason is not None:
        raise SystemExit(f"multi_host needs network namespaces and a PostgreSQL server: {reason}")

    hosts = Hosts(workers=2)
    server = hosts.server
    stack = production_stack(DATABASE, host=server.address, prefix=server.prefix)
    postgres = ScratchPostgres(server.address, server.prefix, stack.log_dir)
    # This process reads the database and tells the workers when to start, over its own link.
    os.environ.update(
        DATABASE_URL=postgres.url(DATABASE), CELERY_BROKER_URL=stack.broker_url, REDIS_URL=stack.redis_url
    )
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "conductor_project.settings.test")
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    import django

    django.setup()
    from django.core.management import call_command

    from messaging.services import api_key_create

    load = os.getloadavg()
    began = time.monotonic()
    steps: list[Step] = []
    try:
        hosts.create()
        postgres.start(databases=(DATABASE,))
        stack.env["DATABASE_URL"] = postgres.url(DATABASE)
        call_command("migrate", verbosity=0)
        key = api_key_create(client_name="bench")[1]
        stack.start(workers=0)
        start_queue_worker(stack, "maintenance", MAINTENANCE_QUEUES, 1)
        print(f"server host {server.address} up (logs {stack.log_dir}); load average {load[0]:.1f}", flush=True)
        for n, count in enumerate((1, 2)):
            steps.append(measure(stack, hosts, key, count, opts, offset=n * opts.messages))
    finally:
        stop_stack(stack)
        postgres.stop()
        hosts.delete()

    one, two = steps
    print(f"\nBulk throughput, sandbox Twilio 50 ms, {os.cpu_count()} cores shared by every host")
    print(f"(load average {load[0]:.1f} when it began; whole run {time.monotonic() - began:.0f} s):\n")
    print("| worker hosts | bulk workers | messages | drain s | msg/s | sends per host | CPU ms/msg | sent once |")
    print("|---:|---|---:|---:|---:|---|---:|---|")
    for s in steps:
        hosts_share = ", ".join(f"{name} {sent:,}" for name, sent in s.per_host.items())
        print(
            f"| {s.hosts} | {s.hosts} x -c {s.concurrency} | {s.messages:,} | {s.drain_s:.1f} | {s.rate:,.0f} "
            f"| {hosts_share} | {s.cpu_ms_per_message:.2f} | {s.once:,} ({s.more} twice, {s.never} never) |"
        )
    print(meaning(one, two, load_at_end=os.getloadavg()[0]))


def meaning(one: Step, two: Step, load_at_end: float) -> str:
    """What the ratio says on this box, from what the steps used."""
    cores = os.cpu_count() or 1
    ratio = two.rate / one.rate if one.rate else float("nan")
    used_one, used_two = (s.rate * s.cpu_ms_per_message / 1000 for s in (one, two))
    said = (
        f"\n2 hosts / 1 host: {ratio:.2f}x. Namespaces give each host its own network, not its own CPU: both "
        f"worker hosts and the server host (PostgreSQL, Redis, the sandbox, web) share these {cores} cores "
        f"(load average {load_at_end:.1f} at the end). The bulk workers used {used_one:.1f} cores' worth of CPU "
        f"with one host and {used_two:.1f} with two (msg/s x CPU per message). "
    )
    if ratio >= 1.2:
        return said + (
            "So one host was bound by its own concurrency (-c processes, each with BULK_SEND_CONCURRENCY "
            "calls in flight against the provider's latency, one claim of BULK_BATCH_SIZE at a time), not by "
            "the cores, and a second host added that again, paid for here with CPU the box had to spare or, on "
            "a loaded box, took from its other work (twice the processes, twice the scheduler's share). On "
            "separate machines a second host brings its cores too; on this one the ratio falls towards 1 as "
            "the cores fill up (a larger campaign, more -c)."
        )
    return said + (
        "The cores were the limit: a second host on the same box adds nothing. On separate machines each "
        "host brings its own cores, and the ratio is then set by what the hosts share, PostgreSQL and the broker."
    )


if __name__ == "__main__":
    main()
