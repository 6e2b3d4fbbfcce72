"""How long the dashboard's JSON endpoint and a /metrics scrape take with a million messages.

Builds its own PostgreSQL database (conductor_bench, dropped and created again), fills it with
--messages messages spread over the last 7 days (97 % delivered, 1 % dead-lettered with a dead
letter each, SMS/email/WhatsApp, three priorities), a provider attempt per message, and a week of
queue-depth samples; counts the delivery buckets with manage.py rebuild_buckets (what beat does a
minute at a time), then times GET /dashboard/data/ for each window and GET /metrics, in process
through Django's test client (view, queries and JSON; no network), --repeats times each.

Run: .venv/bin/python bench/dashboard_endpoint.py [--messages 1000000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from _support import bootstrap, recreate_database

DATABASE = "conductor_bench"
bootstrap(DATABASE)

WEEK_S = 7 * 86400
DEAD, NO_RECEIPT = "g % 100 = 0", "g % 50 = 1"  # 1 % dead-lettered, 2 % never receipted


def column_defaults(model, overrides: dict[str, str], when: str) -> tuple[list[str], list[str]]:
    """Every column of `model` as an SQL expression: the override, else the field's default (a
    required timestamp without one gets `when`)."""
    import json

    from django.db import connection, models

    columns, expressions = [], []
    for field in model._meta.concrete_fields:
        if isinstance(field, models.AutoField) and field.name not in overrides:
            continue  # the database numbers it
        columns.append(connection.ops.quote_name(field.column))
        if field.name in overrides:
            expressions.append(overrides[field.name])
            continue
        default = field.get_default()
        if isinstance(field, models.JSONField):
            expressions.append(f"'{json.dumps(default)}'::jsonb")
        elif default is None and isinstance(field, models.DateTimeField) and not field.null:
            expressions.append(when)
        elif default is None:
            expressions.append("NULL")
        elif isinstance(default, bool):
            expressions.append("true" if default else "false")
        elif isinstance(default, int | float):
            expressions.append(str(default))
        else:
            expressions.append("'" + str(default).replace("'", "''") + "'")
    return columns, expressions


def seed(count: int) -> None:
    from django.db import connection

    from messaging.models import ApiClient, DeadLetter, DispatchAttempt, Message
    from reconciliation.models import QueueDepth

    client = ApiClient.objects.create(name="bench")
    # g runs 1..count, oldest first; t is the acceptance time.
    t = f"(now() - make_interval(secs => {WEEK_S} * (1 - g::float8 / {count})))"
    message_columns, message_values = column_defaults(
        Message,
        {
            "id": "md5(g::text)::uuid",
            "client": str(client.pk),
            "channel": "(ARRAY['sms','sms','email','whatsapp'])[1 + g % 4]",
            "to": "'+1415' || lpad(g::text, 7, '0')",
            "body": "'Your code is 123456'",
            "priority": "(ARRAY['critical','transactional','bulk'])[1 + (g / 4) % 3]",
            "provider": "(ARRAY['twilio','twilio','mailgun','twilio'])[1 + g % 4]",
            "provider_message_id": "'SM' || g",
            "state": f"CASE WHEN {DEAD} THEN 'dead_lettered' WHEN {NO_RECEIPT} THEN 'dispatched' ELSE 'delivered' END",
            "created_at": t,
            "accepted_at": t,
            "enqueued_at": t,
            "expires_at": f"{t} + interval '1 hour'",
            "dispatched_at": f"CASE WHEN {DEAD} THEN NULL ELSE {t} + make_interval(secs => 0.05 + (g % 97) / 60.0) END",
            "delivered_at": f"CASE WHEN {DEAD} OR {NO_RECEIPT} THEN NULL ELSE {t} + make_interval(secs => 2+g%29) END",
            "dead_lettered_at": f"CASE WHEN {DEAD} THEN {t} + interval '5 minutes' END",
            "attempt_count": "1",
        },
        t,
    )
    attempt_columns, attempt_values = column_defaults(
        DispatchAttempt,
        {
            "message": "md5(g::text)::uuid",
            "number": "1",
            "provider": "(ARRAY['twilio','twilio','mailgun','twilio'])[1 + g % 4]",
            "channel": "(ARRAY['sms','sms','email','whatsapp'])[1 + g % 4]",
            "started_at": t,
            "ended_at": f"{t} + interval '120 milliseconds'",
            "outcome": "CASE WHEN g % 100 = 0 THEN 'transient_error' ELSE 'accepted' END",
            "error_type": "CASE WHEN g % 100 = 0 THEN 'provider_5xx' ELSE '' END",
            "latency_ms": "120",
        },
        t,
    )
    dead_columns, dead_values = column_defaults(
        DeadLetter,
        {
            "message": "md5(g::text)::uuid",
            "client": str(client.pk),
            "send_generation": "1",
            "state": "'dead_lettered'",
            "channel": "(ARRAY['sms','sms','email','whatsapp'])[1 + g % 4]",
            "priority": "(ARRAY['critical','transactional','bulk'])[1 + (g / 4) % 3]",
            "provider": "(ARRAY['twilio','twilio','mailgun','twilio'])[1 + g % 4]",
            "error_type": "'provider_5xx'",
            "payload": "'{}'::jsonb",
            "created_at": f"{t} + interval '5 minutes'",
        },
        t,
    )
    with connection.cursor() as cursor:
        for table, columns, values, where in (
            (Message._meta.db_table, message_columns, message_values, ""),
            (DispatchAttempt._meta.db_table, attempt_columns, attempt_values, ""),
            (DeadLetter._meta.db_table, dead_columns, dead_values, "WHERE g % 100 = 0"),
        ):
            started = time.perf_counter()
            cursor.execute(
                f"INSERT INTO {table} ({', '.join(columns)}) "
                f"SELECT {', '.join(values)} FROM generate_series(1, {count}) AS g {where}"
            )
            print(f"  {table}: {cursor.rowcount:,} rows in {time.perf_counter() - started:.1f} s", flush=True)
        # Steady state, as autovacuum leaves a table: statistics, and the visibility map that lets
        # /metrics count messages from its index without reading the table.
        cursor.execute("VACUUM ANALYZE")
    # A week of queue samples: the minute and hour slots beat keeps.
    from datetime import timedelta

    from django.utils import timezone

    from reconciliation.anomalies import floor_time
    from reconciliation.queues import queue_names

    now = timezone.now()
    names = queue_names()
    slots = []
    for seconds in (60, 3600):
        start = floor_time(now - timedelta(seconds=WEEK_S), seconds)
        for i in range(WEEK_S // seconds + 1):
            depths = {name: (i * 7 + n * 13) % 500 for n, name in enumerate(names)}
            slots.append(
                QueueDepth(
                    seconds=seconds,
                    start=start + timedelta(seconds=i * seconds),
                    depths=depths,
                    samples=4,
                    updated_at=now,
                )
            )
    QueueDepth.objects.bulk_create(slots, batch_size=5000)
    print(f"  queue depth slots: {len(slots):,}", flush=True)


def timed(client, path: str, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    recreate_database(DATABASE)
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    settings.ALLOWED_HOSTS = ["*"]
    call_command("migrate", verbosity=0)
    print(f"Seeding {args.messages:,} messages over 7 days into {DATABASE}:", flush=True)
    seed(args.messages)
    started = time.perf_counter()
    call_command("rebuild_buckets", since="8d", verbosity=0)
    print(f"  rebuild_buckets --since 8d: {time.perf_counter() - started:.1f} s", flush=True)

    client = Client()
    client.force_login(User.objects.create_user("bench", password="x", is_staff=True))
    print(f"\nGET timings over {args.repeats} requests each (after one warm-up), ms:\n")
    print("| request | median | p95 | max |")
    print("|---|---|---|---|")
    for path in [f"/dashboard/data/?window={w}" for w in ("15m", "1h", "24h", "7d")] + [
        "/dashboard/data/?window=7d&priority=critical",
        "/metrics",
    ]:
        timed(client, path, 1)
        times = sorted(timed(client, path, args.repeats))
        p95 = times[min(len(times) - 1, round(0.95 * len(times)) - 1)]
        print(f"| `{path}` | {statistics.median(times):.1f} | {p95:.1f} | {times[-1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
