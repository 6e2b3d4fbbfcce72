"""The operations dashboard's data: five series over a window, plus circuits, alerts, the last run,
the status callbacks' backlog, the routes (not healthy now, last changes) and the periodic jobs.

Everything is read from small aggregate tables, never by scanning messages, so the answer stays
fast however many messages there are: delivery buckets (minute rows for 15 min and 1 h, their
hour roll-ups for 24 h and 7 d), queue-depth slots (same two sizes) and dead letters counted
per step on their indexed parked time; the callback backlog from the pending callbacks' partial
index (small however many callbacks were delivered).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Min, Q
from django.db.models.functions import Trunc
from django.utils import timezone

from messaging.ingest import REFUSED_AT_ACCEPTANCE
from messaging.models import Callback, CallbackEndpoint, CallbackState, DeadLetter, DeadLetterKind, ErrorType
from messaging.route_operations import route_row, routes_not_healthy, routing_change_row, routing_changes_recent
from providers.guards import circuit_breaker
from reconciliation import histograms
from reconciliation.alerts import alert_payload
from reconciliation.anomalies import cohort_end, floor_time
from reconciliation.buckets import ROLLUP_SECONDS
from reconciliation.conf import detector_settings
from reconciliation.drills import last_drill
from reconciliation.heartbeats import periodic_job_statuses
from reconciliation.models import Alert, DeliveryBucket, QueueDepth, ReconciliationRun
from reconciliation.queues import queue_names


@dataclass(frozen=True)
class Window:
    name: str
    seconds: int
    step_seconds: int  # one point per step: 60 (minute slots) or 3600 (hour slots)


WINDOWS: dict[str, Window] = {
    w.name: w
    for w in (
        Window("15m", 15 * 60, 60),
        Window("1h", 3600, 60),
        Window("24h", 86400, 3600),
        Window("7d", 7 * 86400, 3600),
    )
}
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
PRIORITIES = ("critical", "transactional", "bulk")


def dashboard_data(*, window: str = "1h", priority: str = "", now: datetime | None = None) -> dict[str, Any]:
    """The JSON the dashboard draws: `times` (epoch seconds, one per step) and a series per line.

    Delivery rate counts a cohort once it is as old as the receipt maturity (None before); latency
    quantiles come from the buckets' histograms, for one priority or all.
    """
    spec = WINDOWS[window]
    now = now or timezone.now()
    detector = detector_settings()
    step = spec.step_seconds
    if step == ROLLUP_SECONDS and detector.bucket_seconds >= ROLLUP_SECONDS:
        step = detector.bucket_seconds
    bucket_seconds = detector.bucket_seconds if step < ROLLUP_SECONDS else ROLLUP_SECONDS
    end = floor_time(now, step)
    start = end - timedelta(seconds=spec.seconds - step)
    times = [start + timedelta(seconds=step * i) for i in range(spec.seconds // step)]
    index = {t: i for i, t in enumerate(times)}
    matured_before = cohort_end(now, detector)
    return {
        "window": spec.name,
        "windows": list(WINDOWS),
        "priority": priority,
        "step_seconds": step,
        "generated_at": now.isoformat(),
        "times": [int(t.timestamp()) for t in times],
        **_bucket_series(times, index, step, bucket_seconds, priority, matured_before),
        "queue_depth": _queue_series(times, index, step),
        "dead_letters": _dead_letter_series(times, index, step),
        "suppressed": _suppressed(times[0], times[-1] + timedelta(seconds=step)),
        "circuits": _circuits(),
        "alerts": _open_alerts(),
        "last_reconciliation": _last_reconciliation(),
        "last_drill": last_drill(),
        "callbacks": callback_backlog(now=now),
        "routes": _routes(),
        # Each job beat runs: last success, interval, overdue or not (reconciliation.heartbeats).
        "periodic_jobs": [status.as_dict() for status in periodic_job_statuses(now=now)],
    }


def _slot(moment: datetime, step: int) -> datetime:
    return floor_time(moment, step)


def _bucket_series(times, index, step, bucket_seconds, priority, matured_before) -> dict[str, Any]:

    size = len(times)
    delivered: dict[str, list[int]] = defaultdict(lambda: [0] * size)
    dispatched: dict[str, list[int]] = defaultdict(lambda: [0] * size)
    attempts = [0] * size
    errors: dict[str, list[int]] = defaultdict(lambda: [0] * size)
    dispatch_latency = [histograms.empty() for _ in range(size)]
    delivery_latency = [histograms.empty() for _ in range(size)]
    immature = [False] * size
    rows = DeliveryBucket.objects.filter(
        country="", seconds=bucket_seconds, start__gte=times[0], start__lt=times[-1] + timedelta(seconds=step)
    ).values_list(
        "channel", "start", "dispatched", "delivered", "attempts", "errors", "dispatch_latency", "delivery_latency"
    )
    for channel, start, n_dispatched, n_delivered, n_attempts, by_error, by_dispatch, by_delivery in rows:
        i = index.get(_slot(start, step))
        if i is None:
            continue
        if start + timedelta(seconds=bucket_seconds) > matured_before:
            immature[i] = True
        dispatched[channel][i] += n_dispatched
        delivered[channel][i] += n_delivered
        attempts[i] += n_attempts
        for kind, count in by_error.items():
            errors[kind][i] += count
        for target, source in ((dispatch_latency, by_dispatch), (delivery_latency, by_delivery)):
            for level, counts in source.items():
                if not priority or level == priority:
                    target[i] = histograms.merged([target[i], counts])
    channels = sorted(set(dispatched) | set(settings.CONDUCTOR_CHANNELS))
    return {
        "delivery_rate": {
            channel: [
                None if immature[i] or not dispatched[channel][i] else delivered[channel][i] / dispatched[channel][i]
                for i in range(size)
            ]
            for channel in channels
        },
        "dispatched": {channel: dispatched[channel] for channel in channels},
        "latency": {
            "dispatch": _quantile_series(dispatch_latency),
            "delivery": _quantile_series(delivery_latency),
        },
        "attempts": attempts,
        "error_rate": {
            kind: [counts[i] / attempts[i] if attempts[i] else None for i in range(size)]
            for kind, counts in sorted(errors.items())
        },
    }


def _quantile_series(per_step: list[list[int]]) -> dict[str, list[float | None]]:
    return {name: [histograms.quantile(counts, q) for counts in per_step] for name, q in QUANTILES}


def _queue_series(times, index, step) -> dict[str, list[int | None]]:

    size = len(times)
    series: dict[str, list[int | None]] = {name: [None] * size for name in queue_names()}
    slots = QueueDepth.objects.filter(
        seconds=step, start__gte=times[0], start__lt=times[-1] + timedelta(seconds=step)
    ).values_list("start", "depths")
    for start, depths in slots:
        i = index.get(_slot(start, step))
        if i is None:
            continue
        for name, depth in depths.items():
            values = series.setdefault(name, [None] * size)
            values[i] = max(depth, values[i] or 0)
    return series


def _dead_letter_series(times, index, step) -> dict[str, list[int]]:

    size = len(times)
    kind = "minute" if step == 60 else "hour"
    counts = (
        DeadLetter.objects.filter(
            kind=DeadLetterKind.MESSAGE, created_at__gte=times[0], created_at__lt=times[-1] + timedelta(seconds=step)
        )
        .annotate(slot=Trunc("created_at", kind))
        .values("slot", "channel")
        .annotate(n=Count("pk"))
        .order_by()
    )
    series: dict[str, list[int]] = {channel: [0] * size for channel in settings.CONDUCTOR_CHANNELS}
    for row in counts:
        i = index.get(_slot(row["slot"], step))
        if i is not None:
            series.setdefault(row["channel"], [0] * size)[i] += row["n"]
    return series


def _suppressed(start: datetime, end: datetime) -> dict[str, int]:
    """Messages refused in the window because their address is suppressed (their dead letters, on
    the parked-time index), by stage: at acceptance, or at dispatch with no hop left. Hops skipped
    before a fallback went are in /metrics only (conductor_messages_suppressed_total)."""
    counts = DeadLetter.objects.filter(
        kind=DeadLetterKind.MESSAGE, error_type=ErrorType.SUPPRESSED, created_at__gte=start, created_at__lt=end
    ).aggregate(total=Count("pk"), acceptance=Count("pk", filter=Q(reason__startswith=REFUSED_AT_ACCEPTANCE)))
    return {"acceptance": counts["acceptance"], "dispatch": counts["total"] - counts["acceptance"]}


def _circuits() -> list[dict[str, Any]]:

    states = []
    for provider in settings.CONDUCTOR_PROVIDERS:
        snapshot = circuit_breaker(provider).snapshot()
        states.append(
            {
                "provider": provider,
                "state": snapshot["state"],
                "failing_open": snapshot.get("failing_open", False),
                "failure_rate": snapshot.get("failure_rate"),
                "times_opened": snapshot.get("times_opened"),
            }
        )
    return states


def _open_alerts() -> list[dict[str, Any]]:

    return [
        alert_payload(alert, "open")
        for alert in Alert.objects.filter(resolved_at__isnull=True).order_by("-opened_at")[:50]
    ]


# Routing changes shown (the admin's Routing changes has them all).
ROUTING_CHANGES_SHOWN = 10


def _routes() -> dict[str, Any]:
    """The provider routes that are not healthy now, and the last routing changes (docs/routing.md)."""
    return {
        "not_healthy": [route_row(route) for route in routes_not_healthy()],
        "changes": [routing_change_row(change) for change in routing_changes_recent(limit=ROUTING_CHANGES_SHOWN)],
    }


def _last_reconciliation() -> dict[str, Any] | None:

    run = ReconciliationRun.objects.order_by("-started_at").first()
    if run is None:
        return None
    return {
        "id": run.pk,
        "status": run.status,
        "trigger": run.trigger,
        "window_start": run.window_start.isoformat(),
        "window_end": run.window_end.isoformat(),
        "started_at": run.started_at.isoformat(),
        "duration_ms": run.duration_ms,
        "checked": run.checked,
        "looked_up": run.looked_up,
        "updated": run.updated,
        "still_unknown": run.still_unknown,
        "mismatches": run.mismatches,
    }


# Endpoints listed in the backlog and among the disabled: the ones most behind.
BACKLOG_TOP = 10


def callback_backlog(*, now: datetime) -> dict[str, Any]:
    """Pending callbacks (all, and per endpoint for the 10 most behind: how many, how many due, the
    oldest one's age and how long the oldest due one has waited), dead callbacks still parked,
    and the disabled endpoints."""
    pending = Callback.objects.filter(state=CallbackState.PENDING)
    per_endpoint = list(
        pending.values("endpoint_id")
        .annotate(
            pending=Count("pk"),
            due=Count("pk", filter=Q(next_attempt_at__lte=now)),
            oldest=Min("created_at"),
            oldest_due=Min("next_attempt_at", filter=Q(next_attempt_at__lte=now)),
        )
        .order_by("oldest")[:BACKLOG_TOP]
    )
    endpoints = CallbackEndpoint.objects.select_related("client").in_bulk([row["endpoint_id"] for row in per_endpoint])
    disabled = CallbackEndpoint.objects.filter(enabled=False)
    return {
        "pending": pending.count(),
        "dead": DeadLetter.objects.filter(kind=DeadLetterKind.CALLBACK, replayed_at__isnull=True).count(),
        "endpoints": [_backlog_row(row, endpoints.get(row["endpoint_id"]), now) for row in per_endpoint],
        "disabled_count": disabled.count(),
        "disabled": [
            {
                "endpoint_id": endpoint.pk,
                "client": endpoint.client.name,
                "url": endpoint.url,
                "disabled_at": _iso(endpoint.disabled_at),
                "disabled_reason": endpoint.disabled_reason,
            }
            for endpoint in disabled.select_related("client").order_by("-disabled_at", "-pk")[:BACKLOG_TOP]
        ],
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _backlog_row(row: dict[str, Any], endpoint: CallbackEndpoint | None, now: datetime) -> dict[str, Any]:
    oldest_due = row["oldest_due"]
    return {
        "endpoint_id": row["endpoint_id"],
        "client": endpoint.client.name if endpoint else "",
        "url": endpoint.url if endpoint else "",
        "enabled": endpoint.enabled if endpoint else False,
        "failing_since": _iso(endpoint.failing_since) if endpoint else None,
        "pending": row["pending"],
        "due": row["due"],
        "oldest_age_seconds": max(0.0, (now - row["oldest"]).total_seconds()),
        "oldest_due_wait_seconds": max(0.0, (now - oldest_due).total_seconds()) if oldest_due else None,
    }
