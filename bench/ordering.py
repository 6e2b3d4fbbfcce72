"""Does per-key ordering slow down the messages that do not ask for it?

Starts the real stack (sandbox at 50 ms per send, web, beat, 4 Celery workers of 2 processes,
production settings) on its own database, and for each variant posts the same load through the batch API from 8
client threads, then measures the throughput of the unordered messages only: how many were
dispatched per second, from the first acceptance to the last dispatch.

  plain     2,000 unordered messages and 1,000 more unordered ones (the same load, no ordering)
  ordered   2,000 unordered messages and 1,000 ordered ones (50 keys x 20, waiting in turn)
  alone     the 2,000 unordered messages by themselves (for scale)

"plain" versus "ordered" isolates what ordering costs the others: the same number of sends in
both, only the keys differ. Variants run interleaved, --repeats times.

Run: .venv/bin/python bench/ordering.py [--unordered 2000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
import time

from _support import bootstrap, recreate_database

DATABASE = "conductor_bench_ordering"
bootstrap(DATABASE)

KEYS, PER_KEY, THREADS, WORKERS = 50, 20, 8, 4


def items_for(variant: str, unordered: int, run: int) -> list[dict]:
    plain = [
        {"channel": "sms", "to": f"+1415557{i % 10000:04d}", "body": f"plain {i}", "category": "unordered"}
        for i in range(unordered)
    ]
    if variant == "alone":
        return plain
    extra = [
        {
            "channel": "sms",
            "to": f"+1415558{k:02d}{n:02d}",
            "body": f"update {n} for order {k}",
            "category": "extra",
            **({"ordering_key": f"run{run}-order-{k}"} if variant == "ordered" else {}),
        }
        for n in range(PER_KEY)
        for k in range(KEYS)
    ]
    # Interleaved as a real client would send them: the extra traffic mixed into the plain.
    mixed, step = [], max(1, len(plain) // len(extra))
    extra_iter = iter(extra)
    for i, item in enumerate(plain):
        mixed.append(item)
        if i % step == 0:
            mixed.extend(item for item in [next(extra_iter, None)] if item)
    mixed.extend(extra_iter)
    return mixed


def post_all(stack, key: str, items: list[dict]) -> None:
    chunks = [items[i : i + 50] for i in range(0, len(items), 50)]
    lock = threading.Lock()

    def client() -> None:
        session = stack.api(key)
        while True:
            with lock:
                if not chunks:
                    return
                chunk = chunks.pop(0)
            response = session.post(f"{stack.web_url}/api/v1/messages/batch/", json={"messages": chunk}, timeout=120)
            response.raise_for_status()

    threads = [threading.Thread(target=client) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def run_variant(stack, key: str, variant: str, unordered: int, run: int) -> float:
    from django.db.models import Max, Min

    from messaging.models import Message

    Message.objects.all().delete()
    items = items_for(variant, unordered, run)
    post_all(stack, key, items)
    deadline = time.monotonic() + 600
    while Message.objects.exclude(state__in=["dispatched", "delivered"]).exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{variant}: not everything was dispatched within 10 minutes")
        time.sleep(0.5)
    plain = Message.objects.filter(category="unordered")
    span = plain.aggregate(first=Min("accepted_at"), last=Max("dispatched_at"))
    return plain.count() / (span["last"] - span["first"]).total_seconds()


def main() -> None:
    # A stopped benchmark still stops the processes it started (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unordered", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    recreate_database(DATABASE)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    from messaging.services import api_key_create
    from tests.support.stack import Stack

    key = api_key_create(client_name="bench")[1]
    stack = Stack(DATABASE)
    # Production timings (the test settings re-enqueue anything queued over 5 s, which a backlog
    # of thousands always is): the sweeper every 5 s, a task stale after 60 s (transactional).
    stack.env["DJANGO_SETTINGS_MODULE"] = "conductor_project.settings.base"
    stack.env["CONDUCTOR_SWEEP_INTERVAL_SECONDS"] = "5"
    try:
        stack.start(workers=0)
        for _ in range(WORKERS):
            stack.start_worker(concurrency=2)
        stack.sandbox_faults(provider="twilio", latency_ms=50)
        results: dict[str, list[float]] = {"plain": [], "ordered": [], "alone": []}
        run = 0
        for _ in range(args.repeats):
            for variant in results:
                run += 1
                stack.sandbox_reset()
                stack.sandbox_faults(provider="twilio", latency_ms=50)
                rate = run_variant(stack, key, variant, args.unordered, run)
                results[variant].append(rate)
                print(f"  {variant:8s} run {run}: {rate:.1f} unordered messages dispatched/s", flush=True)
    finally:
        stack.stop()
    plain = statistics.median(results["plain"])
    print(f"\nUnordered throughput ({args.unordered} messages; 4 workers x 2; sandbox 50 ms), medians:\n")
    print("| variant | unordered msg/s | vs plain |")
    print("|---|---|---|")
    for variant, rates in results.items():
        median = statistics.median(rates)
        each = ", ".join(f"{r:.1f}" for r in rates)
        print(f"| {variant} | {median:.1f} ({each}) | {100 * (median / plain - 1):+.1f} % |")


if __name__ == "__main__":
    main()
