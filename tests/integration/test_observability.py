"""/metrics and the logs, from real processes: two Celery workers, gunicorn's two web workers
(which take the receipts) and beat each record events; one scrape of the web must add them all
up to what the database says happened, and every transition and attempt is one JSON log line."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import requests
from django.db.models import Count, Q
from prometheus_client.parser import text_string_to_metric_families

from messaging.models import DispatchAttempt, Message, MessageEvent
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import post_batch, wait_for_all
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

REAL_CALLS = (
    "accepted",
    "found_at_provider",
    "not_found_at_provider",
    "transient_error",
    "permanent_error",
    "ambiguous",
)


def scrape(stack) -> dict[tuple[str, tuple], float]:
    """Every sample of one scrape, keyed by (sample name, sorted labels)."""
    response = requests.get(f"{stack.web_url}/metrics", timeout=10)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def totals(samples, name: str, *labels: str) -> Counter:
    """Sum of one sample name's values grouped by `labels` (zero-valued groups dropped)."""
    grouped: Counter = Counter()
    for (sample, sample_labels), value in samples.items():
        if sample == name:
            values = dict(sample_labels)
            grouped[tuple(values[label] for label in labels)] += value
    return +grouped


def changed(before, after, name: str, *labels: str) -> Counter:
    """How much one counter or histogram count grew between two scrapes, by `labels`."""
    old, new = totals(before, name, *labels), totals(after, name, *labels)
    return +Counter({key: new[key] - old.get(key, 0) for key in new})


def json_lines(process) -> list[dict]:
    lines = []
    for line in process.log_text().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_metrics_from_two_workers_and_the_web_add_up_to_the_database(live):
    key = api_key_create(client_name="acme")[1]
    workers = live.replace_workers(count=2, concurrency=2)
    live.sandbox_faults(error_rate=0.25, latency_ms=30)
    # Email has no second provider here (no SMTP relay runs): at 25 % errors a cluster could open
    # Mailgun's circuit and dead-letter a message within the fast retries, which is not this test.
    live.sandbox_faults(provider="mailgun", error_rate=0.1, latency_ms=30)
    before = scrape(live)
    items = [
        {
            "channel": "sms" if i % 3 else "email",
            "to": f"+1415555{3000 + i:04d}" if i % 3 else f"person{i}@example.com",
            "body": "Your code is 123456",
            "priority": ("critical", "transactional", "bulk")[i % 3 if i % 2 else 0],
            "category": "fast_retry",
        }
        for i in range(120)
    ]
    ids = post_batch(live, key, items)
    wait_for_all(ids, {"delivered", "read"}, timeout=180)
    # The last receipt's state is visible a moment before its process records the metric (on commit).
    wait_until(
        lambda: (
            sum(totals(scrape(live), "conductor_delivery_latency_seconds_count").values())
            - sum(totals(before, "conductor_delivery_latency_seconds_count").values())
            >= 120
        ),
        10,
        what="every delivery counted",
    )
    after = scrape(live)

    # Both workers sent (the comparison below would hold for one, but then it would not test much).
    per_worker = [sum(1 for line in json_lines(w) if line.get("event") == "attempt") for w in workers]
    assert all(per_worker), per_worker

    # State gauges: read from the database at scrape time.
    in_db = Counter(
        {
            (row["channel"], row["provider"] or "none", row["state"]): row["n"]
            for row in Message.objects.values("channel", "provider", "state").annotate(n=Count("pk")).order_by()
        }
    )
    assert totals(after, "conductor_messages", "channel", "provider", "state") == in_db

    # Event counters and histograms: written by whichever process saw the event, summed by the scrape.
    dispatched = Message.objects.filter(dispatched_at__isnull=False).values("channel", "priority")
    expected_dispatch = Counter({(r["channel"], r["priority"]): r["n"] for r in dispatched.annotate(n=Count("pk"))})
    got_dispatch = changed(before, after, "conductor_dispatch_latency_seconds_count", "channel", "priority")
    assert got_dispatch == expected_dispatch and sum(got_dispatch.values()) == 120

    arrived = Message.objects.filter(Q(delivered_at__isnull=False) | Q(read_at__isnull=False)).values(
        "channel", "priority"
    )
    expected_delivery = Counter({(r["channel"], r["priority"]): r["n"] for r in arrived.annotate(n=Count("pk"))})
    got_delivery = changed(before, after, "conductor_delivery_latency_seconds_count", "channel", "priority")
    assert got_delivery == expected_delivery

    calls = DispatchAttempt.objects.filter(outcome__in=REAL_CALLS)
    expected_attempts = Counter(
        {(r["channel"], r["provider"], r["outcome"]): r["n"]
         for r in calls.values("channel", "provider", "outcome").annotate(n=Count("pk")).order_by()}
    )  # fmt: skip
    got_attempts = changed(before, after, "conductor_provider_attempts_total", "channel", "provider", "outcome")
    assert got_attempts == expected_attempts
    errors = calls.exclude(error_type="").values("channel", "provider", "error_type").annotate(n=Count("pk"))
    expected_errors = Counter({(r["channel"], r["provider"], r["error_type"]): r["n"] for r in errors.order_by()})
    got_errors = changed(before, after, "conductor_provider_errors_total", "channel", "provider", "error_type")
    assert got_errors == expected_errors
    assert sum(got_errors.values()) > 0, "the fault was not injected"

    # Queue depth (from the broker) and circuits (from Redis) are there too.
    from django.conf import settings

    for queue in settings.CELERY_TASK_QUEUES:
        assert ("conductor_queue_depth", (("queue", queue.name),)) in after
    assert after[("conductor_scrape_error", (("source", "broker"),))] == 0
    assert sum(totals(after, "conductor_circuit_state", "provider").values()) == 4  # one state each

    # Logs: one JSON line per applied transition and per provider call, carrying the message id;
    # no full recipient anywhere.
    # (The web and beat processes serve the whole session: keep this test's messages' lines.)
    ours = set(ids)
    lines = [line for process in live.processes for line in json_lines(process) if line.get("message_id") in ours]
    applied = [line for line in lines if line.get("event") == "transition" and line["applied"]]
    transitions = Counter((line["message_id"], line["to_state"]) for line in applied)
    expected_transitions = Counter(
        (str(m), s) for m, s in MessageEvent.objects.filter(applied=True).values_list("message_id", "to_state")
    )
    assert transitions == expected_transitions
    attempts = Counter((line["message_id"], line["attempt"]) for line in lines if line.get("event") == "attempt")
    assert attempts == Counter((str(m), n) for m, n in calls.values_list("message_id", "number"))
    for line in lines:
        if line.get("event") == "attempt":
            assert line["channel"] and line["provider"] and line["outcome"] and "*" in line["to"]
    text = "\n".join(process.log_text() for process in live.processes)
    assert "+14155553001" not in text and "person0@example.com" not in text
