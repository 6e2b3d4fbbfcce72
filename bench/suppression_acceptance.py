"""Issue 22: what the suppression check at acceptance costs a bulk batch (messaging.ingest).

In this process, on its own database (--database, dropped and created again): 1,000-message bulk
SMS batches accepted by messages_create_many (the service the batch API calls; no HTTP, so the
check's share is the largest it can be), published to nowhere, log lines off. Variants, in turn
batch by batch:

  off      SuppressionIndex.load replaced by an empty index (no query): the code before the check
  empty    the check, the client has no suppressions
  50k      the check, the client has 50,000 suppressions, none of the batch's numbers
  hit 1 %  the check, 10 of each batch's 1,000 numbers suppressed (stored failed: transitions)

Figures: median ms per batch per variant and the cost against `off`.

Run: .venv/bin/python bench/suppression_acceptance.py [--database conductor_bench_suppressions]
[--batches 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

from _support import fresh_database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", default="conductor_bench_suppressions")
    parser.add_argument("--batches", type=int, default=20, help="batches per variant and repeat (default 20)")
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    fresh_database(options.database)
    logging.disable(logging.INFO)  # a line per accepted message: the terminal is not measured

    from django.db import transaction

    import messaging.ingest as ingest
    from messaging.ingest import BatchItem, messages_create_many
    from messaging.models import ApiClient, Message, Suppression
    from messaging.suppressions.selectors import SuppressionIndex

    ingest.messages_publish = lambda *, messages: None  # nothing consumes: the broker is not measured
    real_load = SuppressionIndex.load
    quiet = ApiClient.objects.create(name="bench-empty")
    listed = ApiClient.objects.create(name="bench-50k")
    now = listed.created_at
    hit_client = ApiClient.objects.create(name="bench-hit")
    with transaction.atomic():
        numbers = [f"+1{area}555{i:04d}" for area in (212, 312, 646, 718) for i in range(10_000)]
        emails = [f"user{i}@example.com" for i in range(10_000)]
        Suppression.objects.bulk_create(
            [Suppression(client=listed, channel="sms", address=a, reason="manual", created_at=now) for a in numbers]
            + [Suppression(client=listed, channel="email", address=a, reason="manual", created_at=now) for a in emails],
            batch_size=5000,
        )
        Suppression.objects.bulk_create(  # 10 of each batch's numbers
            [
                Suppression(
                    client=hit_client, channel="sms", address=f"+1415555{i:04d}", reason="stop_keyword", created_at=now
                )
                for i in range(0, 1000, 100)
            ]
        )
    items = [
        BatchItem(
            fields={
                "channel": "sms",
                "to": f"+1415555{i:04d}",
                "body": "20% off today",
                "priority": "bulk",
                "category": "promo",
            }
        )
        for i in range(1000)
    ]
    variants = {"off": quiet, "empty": quiet, "50k": listed, "hit 1 %": hit_client}
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(options.repeats):
        for _ in range(options.batches):  # variants in turn batch by batch: the machine's load drifts
            for name, client in variants.items():
                SuppressionIndex.load = (lambda triples: SuppressionIndex({}, {})) if name == "off" else real_load
                started = time.perf_counter()
                results = messages_create_many(client=client, items=items)
                timings[name].append((time.perf_counter() - started) * 1000)
                assert len(results) == 1000
        Message.objects.all().delete()
        print(f"repeat {repeat + 1}: " + ", ".join(f"{n} {statistics.median(t):.1f} ms" for n, t in timings.items()))
    SuppressionIndex.load = real_load
    base = statistics.median(timings["off"])
    print(f"\n1,000-message bulk batch through messages_create_many, median of {len(timings['off'])} batches:")
    print("| variant | ms per batch | vs off |")
    print("|---|---:|---:|")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {(median - base) / base * 100:+.1f} % |")


if __name__ == "__main__":
    main()
