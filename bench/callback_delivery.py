"""How many status callbacks a second one deliverer process sends to a healthy client endpoint.

    python -m bench.callback_delivery [--callbacks 5000] [--endpoints 1] [--per-endpoint 16]
                                      [--events 4] [--latency-ms 0] [--timeout 10] [--faults JSON]
                                      [--database conductor_bench_callbacks]

Pre-creates the callbacks (`--events` per message, the outbox's shape) on a fresh database, starts
the fault-injecting receiver (tests/support/callback_receiver.py, verifying every signature with
the standardwebhooks library) as a process of its own, then runs one deliverer in this process
(messaging.callbacks.delivery, as the `messaging.deliver_callbacks` task runs it) until every
callback is delivered. Per message, callbacks go in sequence order, so a message's next callback
waits for its previous one's recorded answer: the figure includes that.
Prints callbacks/s, this process's CPU per callback and what the receiver counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import uuid

from bench._support import fresh_database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callbacks", type=int, default=5000)
    parser.add_argument("--endpoints", type=int, default=1)
    parser.add_argument("--per-endpoint", type=int, default=16, help="CALLBACK_CONCURRENCY_PER_ENDPOINT")
    parser.add_argument("--concurrency", type=int, default=256, help="CALLBACK_CONCURRENCY")
    parser.add_argument("--events", type=int, default=4, help="callbacks per message")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the receiver's added latency")
    parser.add_argument(
        "--dead-endpoint",
        choices=["refuse", "hold"],
        help="another client's endpoint, down for the whole run (connections refused, or held past the timeout), "
        "with as many callbacks as the healthy ones: the healthy endpoints' lag must not suffer",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="CALLBACK_TIMEOUT_SECONDS")
    parser.add_argument("--faults", default="{}", help='more receiver faults, JSON, e.g. {"error_rate": 0.3}')
    parser.add_argument("--database", default="conductor_bench_callbacks")
    args = parser.parse_args()
    os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/13")
    fresh_database(args.database)

    from django.conf import settings
    from django.db import connection
    from django.db.models import Max, Min
    from django.utils import timezone

    from messaging.callbacks.delivery import callbacks_deliver
    from messaging.callbacks.signing import new_secret
    from messaging.models import ApiClient, Callback, CallbackEndpoint, Message
    from messaging.rows import rows_insert
    from providers.redis_state import shared_redis
    from tests.support.callback_receiver import ReceiverProcess

    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "CALLBACK_CONCURRENCY_PER_ENDPOINT": args.per_endpoint,
        "CALLBACK_CONCURRENCY": args.concurrency,
        "CALLBACK_TIMEOUT_SECONDS": args.timeout,
        "CALLBACK_LEASE_SECONDS": max(60.0, 2 * args.timeout),
        # Production's backoff (the test settings retry within 2 s, which would keep a dead
        # endpoint's callbacks due all the time).
        "CALLBACK_BACKOFF_BASE_SECONDS": 5.0,
        "CALLBACK_BACKOFF_MAX_SECONDS": 3600.0,
    }
    shared_redis().flushdb()
    secret = new_secret()
    dead_receiver = None
    receiver = ReceiverProcess(secrets=[secret], faults={"latency_ms": args.latency_ms, **json.loads(args.faults)})
    try:
        receiver.start()
        client = ApiClient.objects.get(name="bench")
        now = timezone.now()
        endpoints = [
            CallbackEndpoint.objects.create(
                client=client,
                url=receiver.url(f"/client-{n}"),
                secrets=[{"secret": secret, "created_at": now.isoformat(), "expires_at": None}],
            )
            for n in range(args.endpoints)
        ]
        message_count = args.callbacks // args.events
        messages = [
            Message(
                client=client,
                channel="sms",
                to="+14155552671",
                body="bench",
                expires_at=now,
                created_at=now,
                accepted_at=now,
                state="delivered",
            )
            for _ in range(message_count)
        ]
        rows_insert(Message, messages)
        events = ["accepted", "dispatched", "delivered", "read", "attempt.failed"][: args.events]
        rows = []
        for index, message in enumerate(messages):
            for sequence, event in enumerate(events, start=1):
                rows.append(
                    Callback(
                        webhook_id="msg_" + uuid.uuid4().hex,
                        endpoint=endpoints[index % len(endpoints)],
                        message=message,
                        event=event,
                        sequence=sequence,
                        occurred_at=now,
                        payload={
                            "type": f"message.{event}",
                            "timestamp": now.isoformat(),
                            "data": {
                                "message_id": str(message.pk),
                                "event": event,
                                "sequence": sequence,
                                "occurred_at": now.isoformat(),
                                "state": "delivered",
                                "channel": "sms",
                                "priority": "transactional",
                                "category": "",
                                "provider": "twilio",
                                "error": None,
                            },
                        },
                        next_attempt_at=now,
                        created_at=now,
                    )
                )
        dead_receiver = None
        if args.dead_endpoint:
            other = ApiClient.objects.create(name="bench-dead")
            if args.dead_endpoint == "hold":
                dead_receiver = ReceiverProcess(secrets=[secret], faults={"timeout_rate": 1.0, "hold_seconds": 600})
                dead_url = dead_receiver.start().url("/dead")
            else:
                dead_url = "http://127.0.0.1:9/dead"  # nothing listens on the discard port: refused
            dead = CallbackEndpoint.objects.create(
                client=other,
                url=dead_url,
                secrets=[{"secret": secret, "created_at": now.isoformat(), "expires_at": None}],
            )
            rows += [
                Callback(
                    webhook_id="msg_" + uuid.uuid4().hex,
                    endpoint=dead,
                    message=row.message,
                    event=row.event,
                    sequence=row.sequence,
                    occurred_at=row.occurred_at,
                    payload=row.payload,
                    next_attempt_at=now,
                    created_at=now,
                )
                for row in list(rows)
            ]
        rows_insert(Callback, rows)
        with connection.cursor() as cursor:  # as autovacuum would soon: the planner sees the rows
            cursor.execute("ANALYZE messaging_message, messaging_callback")
        total = len(rows)
        print(
            f"{total} callbacks of {message_count} messages to {args.endpoints} endpoint(s), "
            f"{args.per_endpoint} in flight per endpoint"
        )

        receiver_cpu_before = _cpu_seconds(receiver.process.pid)
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        # Lags count from here: every row is written by now (writing the dead endpoint's as well
        # took longer, which said nothing about delivery).
        started_at = timezone.now()
        report = callbacks_deliver(budget_s=600)
        elapsed = time.perf_counter() - began
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        healthy = Callback.objects.filter(endpoint__in=endpoints)
        lags = sorted(
            (done - max(made, started_at)).total_seconds()
            for made, done in healthy.filter(state="delivered").values_list("created_at", "delivered_at")
        )
        if lags:
            p50, p99 = lags[len(lags) // 2], lags[min(len(lags) - 1, int(len(lags) * 0.99))]
            print(
                f"healthy endpoint(s): {len(lags)} of {healthy.count()} delivered, deliverer start -> delivered "
                f"p50 {p50:.2f} s, p99 {p99:.2f} s, last {lags[-1]:.2f} s"
                + (f" (beside a dead endpoint: {args.dead_endpoint})" if args.dead_endpoint else "")
            )
        delivered = Callback.objects.filter(state="delivered").count()
        span = Callback.objects.aggregate(first=Min("delivered_at"), last=Max("delivered_at"))
        sending_s = (span["last"] - span["first"]).total_seconds()
        receiver_cpu = _cpu_seconds(receiver.process.pid) - receiver_cpu_before
        summary = receiver.summary()
        print(
            f"delivered {delivered}/{total} in {elapsed:.2f} s, {delivered / elapsed:,.0f} callbacks/s "
            f"({delivered / sending_s:,.0f}/s from the first delivered to the last: without the start "
            f"and the idle deliverer's last look)"
        )
        print(f"  {report}")
        print(f"deliverer CPU {cpu:.2f} s, {cpu / max(delivered, 1) * 1e6:,.0f} µs per callback")
        per_request = receiver_cpu / max(delivered, 1) * 1e6
        print(f"receiver CPU {receiver_cpu:.2f} s, {per_request:,.0f} µs per request: {summary}")
    finally:
        receiver.stop()
        if args.dead_endpoint and dead_receiver is not None:
            dead_receiver.stop()


def _cpu_seconds(pid: int) -> float:
    """A process's user + system CPU so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
