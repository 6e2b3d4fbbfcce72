"""What /metrics exposes, and where each number comes from.

Two kinds, chosen by what can be correct with many processes:
- Events (latency histograms, provider attempts and errors) are recorded by the process that saw
  them (messaging/metrics.py) and summed across processes by prometheus-client's multiprocess
  mode when PROMETHEUS_MULTIPROC_DIR is set.
- State (messages by state, dead letters, queue depth, circuits, delivery rate, alerts) is read
  at scrape time from where it lives: PostgreSQL, the broker, Redis. A gauge kept in process
  memory would disagree between processes and go stale when one dies; the source cannot.
A source that does not answer leaves its families out and sets conductor_scrape_error{source}.
The database's families (nine queries, one over every message, and the periodic jobs' three) are
kept for METRICS_CACHE_SECONDS per process: Prometheus scrapes every 15 s, and two scrapers, or a
scraper retrying, must not double the load on the database.

Reading the periodic jobs' heartbeats also judges them (opens and resolves their alerts:
reconciliation.heartbeats): Prometheus' scrape is a clock beat does not drive, so a dead beat is
noticed, at most once per METRICS_CACHE_SECONDS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Sum
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from messaging.callbacks.selectors import callbacks_backlog_by_endpoint, callbacks_pending_count
from messaging.models import DeadLetter, Message, ProviderRoute, Receipt, RouteCondition
from providers.guards import circuit_breaker
from reconciliation.anomalies import cohort_end
from reconciliation.conf import detector_settings
from reconciliation.heartbeats import JobStatus, periodic_jobs_check
from reconciliation.models import Alert, DeliveryBucket
from reconciliation.queues import queue_depths

logger = logging.getLogger(__name__)

# conductor_delivery_rate covers the matured cohorts of this long a span.
DELIVERY_RATE_WINDOW = timedelta(minutes=15)
CIRCUIT_STATES = ("closed", "open", "half_open")


def metrics_registry() -> CollectorRegistry:
    """A registry for one scrape: every process's event metrics plus state read now."""
    registry = CollectorRegistry(auto_describe=False)
    if settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(registry, path=settings.PROMETHEUS_MULTIPROC_DIR)
    else:
        registry.register(_ThisProcess())
    registry.register(StateCollector())
    return registry


class _ThisProcess:
    """Without a multiprocess directory only this process's own events can be shown."""

    def collect(self):
        for family in REGISTRY.collect():
            if family.name.startswith("conductor_"):
                yield family


def _counted(
    name: str, documentation: str, rows, labels: list[str], label_names: dict[str, str] | None = None
) -> GaugeMetricFamily:
    """A gauge of row counts grouped by the fields `labels` (one GROUP BY query), each exported
    under its name in `label_names` if it has one; an empty label reads "none"."""
    family = GaugeMetricFamily(name, documentation, labels=[(label_names or {}).get(label, label) for label in labels])
    # COUNT(*) rather than COUNT(id): an index on the labels then answers without the table.
    for row in rows.values(*labels).annotate(n=Count("*")).order_by():
        family.add_metric([row[label] or "none" for label in labels], row["n"])
    return family


class _DatabaseFamiliesCache:
    """The database's families as last read, and when (time.monotonic), for METRICS_CACHE_SECONDS."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read_at: float | None = None
        self._families: list[GaugeMetricFamily] = []

    def get(self, read) -> list[GaugeMetricFamily]:
        """The cached families while fresh, else read() now (not cached if it raises)."""
        max_age = float(getattr(settings, "METRICS_CACHE_SECONDS", 0) or 0)
        with self._lock:  # one reader at a time: concurrent scrapes wait for it rather than query too
            now = time.monotonic()
            if max_age <= 0 or self._read_at is None or now - self._read_at >= max_age:
                self._families = list(read())
                self._read_at = now
            return self._families

    def clear(self) -> None:
        with self._lock:
            self._read_at = None
            self._families = []


database_families_cache = _DatabaseFamiliesCache()


class StateCollector:
    def collect(self):
        errors = GaugeMetricFamily(
            "conductor_scrape_error", "1 when a source did not answer this scrape.", labels=["source"]
        )
        for source, families in (
            ("database", lambda: database_families_cache.get(self._database)),
            ("broker", self._broker),
            ("redis", self._circuits),
        ):
            try:
                collected = list(families())
            except Exception as exc:  # a scrape must answer even when a source is down
                logger.warning("metrics: %s unavailable: %s", source, type(exc).__name__)
                errors.add_metric([source], 1)
                continue
            errors.add_metric([source], 0)
            yield from collected
        yield errors

    def _database(self):
        yield _counted(
            "conductor_messages",
            "Messages by channel, provider and state.",
            Message.objects.all(),
            ["channel", "provider", "state"],
        )
        yield _counted(
            "conductor_dead_letters",
            "Parked dead letters of messages (given up on, not replayed) by channel and error type.",
            DeadLetter.objects.filter(kind="message", replayed_at__isnull=True),
            ["channel", "error_type"],
        )
        yield _counted(
            "conductor_messages_delivery_unknown",
            "Dispatched messages whose receipt never came within the provider's receipt horizon.",
            Message.objects.filter(state="dispatched", receipt_unknown_at__isnull=False),
            ["channel", "provider"],
        )
        yield _counted(
            "conductor_alerts_open",
            "Open delivery alerts by kind, channel, provider and severity.",
            Alert.objects.filter(resolved_at__isnull=True),
            ["kind", "channel", "provider", "severity"],
        )
        yield _counted(
            "conductor_receipts_unmatched",
            "Provider receipts that changed nothing because they match no send of ours, by why "
            "(no_message, no_attempt, id_mismatch, never_dispatched).",
            Receipt.objects.exclude(unmatched_reason=""),
            ["provider", "unmatched_reason"],
            {"unmatched_reason": "reason"},
        )
        yield _counted(
            "conductor_receipts_pending",
            "Provider receipts stored and not yet applied to their messages.",
            Receipt.objects.filter(processed_at__isnull=True),
            ["provider"],
        )
        yield delivery_rate_family()
        yield from callback_backlog_families()
        yield from route_families()
        yield from periodic_job_families(periodic_jobs_check())

    def _broker(self):
        family = GaugeMetricFamily(
            "conductor_queue_depth", "Tasks waiting in each Celery queue (read from the broker).", labels=["queue"]
        )
        for queue, depth in queue_depths().items():
            family.add_metric([queue], depth)
        yield family

    def _circuits(self):
        family = GaugeMetricFamily(
            "conductor_circuit_state",
            "1 for each provider's current circuit state (closed, open or half_open), 0 for the others.",
            labels=["provider", "state"],
        )
        failing_open = GaugeMetricFamily(
            "conductor_circuit_failing_open",
            "1 when the circuit state in Redis cannot be read (every call is let through).",
            labels=["provider"],
        )
        for provider in settings.CONDUCTOR_PROVIDERS:
            snapshot = circuit_breaker(provider).snapshot()
            for state in CIRCUIT_STATES:
                family.add_metric([provider, state], 1 if snapshot["state"] == state else 0)
            failing_open.add_metric([provider], 1 if snapshot.get("failing_open") else 0)
        yield family
        yield failing_open


def periodic_job_families(statuses: list[JobStatus]) -> list[GaugeMetricFamily]:
    """Each periodic job's age since its last success, its interval and whether it is overdue.

    Labelled `task`, not `job`: Prometheus sets `job` on every series (the scrape job's name)."""
    age = GaugeMetricFamily(
        "conductor_periodic_job_last_success_age_seconds",
        "Seconds since each periodic job (a task beat runs) last succeeded; never having succeeded, "
        "since it was first expected.",
        labels=["task"],
    )
    interval = GaugeMetricFamily(
        "conductor_periodic_job_interval_seconds",
        "Each periodic job's interval in the beat schedule (a crontab's longest gap between runs).",
        labels=["task"],
    )
    overdue = GaugeMetricFamily(
        "conductor_periodic_job_overdue",
        "1 when a periodic job has not succeeded for PERIODIC_JOB_OVERDUE_INTERVALS of its intervals plus "
        "PERIODIC_JOB_OVERDUE_GRACE_SECONDS (an alert is open), else 0.",
        labels=["task"],
    )
    for status in statuses:
        age.add_metric([status.task], status.age_seconds)
        if status.interval_seconds is not None:
            interval.add_metric([status.task], status.interval_seconds)
        overdue.add_metric([status.task], 1 if status.overdue else 0)
    return [age, interval, overdue]


def route_families() -> list[GaugeMetricFamily]:
    """Each provider route's condition (1 for the current one) and weight: a few rows, one query.
    A provider with no row is healthy in route order and not listed (country "all": every country)."""
    condition = GaugeMetricFamily(
        "conductor_route_condition",
        "1 for each provider route's current condition (healthy, degraded, drained), 0 for the others "
        "(docs/routing.md); country all: every country.",
        labels=["provider", "country", "condition"],
    )
    weight = GaugeMetricFamily(
        "conductor_route_weight",
        "Each provider route's weight in its channel's split, where one is set.",
        labels=["provider", "country"],
    )
    for route in ProviderRoute.objects.order_by("provider", "country").only(
        "provider", "country", "condition", "weight"
    ):
        country = route.country or "all"
        for value in RouteCondition.values:
            condition.add_metric([route.provider, country, value], 1 if route.condition == value else 0)
        if route.weight is not None:
            weight.add_metric([route.provider, country], route.weight)
    return [condition, weight]


# Endpoints shown in conductor_callback_backlog_age_seconds: those waiting longest (bounded series).
CALLBACK_BACKLOG_ENDPOINTS = 20


def callback_backlog_families() -> list[GaugeMetricFamily]:
    """How long the oldest due callback of each of the most behind endpoints has waited, and how
    many callbacks are pending in all."""
    now = timezone.now()
    age = GaugeMetricFamily(
        "conductor_callback_backlog_age_seconds",
        f"Seconds the oldest due, undelivered callback of an endpoint has waited (the "
        f"{CALLBACK_BACKLOG_ENDPOINTS} endpoints furthest behind; labelled by endpoint id).",
        labels=["endpoint"],
    )
    for backlog in callbacks_backlog_by_endpoint(now=now, limit=CALLBACK_BACKLOG_ENDPOINTS):
        age.add_metric([str(backlog.endpoint_id)], max(0.0, (now - backlog.oldest_due_at).total_seconds()))
    pending = GaugeMetricFamily(
        "conductor_callbacks_pending", "Status callbacks not yet delivered nor given up on (due or waiting to retry)."
    )
    pending.add_metric([], callbacks_pending_count())
    return [age, pending]


def delivery_rate_family() -> GaugeMetricFamily:
    """Delivered / dispatched per channel over the matured cohorts of the last 15 minutes.

    Read from the delivery buckets anomaly detection keeps: a cohort counts once it is as old as
    the receipt maturity, so receipts still on their way do not look like a drop.
    """
    detector = detector_settings()
    end = cohort_end(timezone.now(), detector)
    totals = (
        DeliveryBucket.objects.filter(
            country="", seconds=detector.bucket_seconds, start__gte=end - DELIVERY_RATE_WINDOW, start__lt=end
        )
        .values("channel")
        .annotate(dispatched=Sum("dispatched"), delivered=Sum("delivered"))
        .order_by()
    )
    family = GaugeMetricFamily(
        "conductor_delivery_rate",
        "Delivered / dispatched per channel, matured cohorts of the last 15 minutes (receipt maturity applied).",
        labels=["channel"],
    )
    by_channel: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in totals:
        by_channel[row["channel"]][0] += row["delivered"] or 0
        by_channel[row["channel"]][1] += row["dispatched"] or 0
    for channel, (delivered, dispatched) in sorted(by_channel.items()):
        if dispatched:
            family.add_metric([channel], delivered / dispatched)
    return family
