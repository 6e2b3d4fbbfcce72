"""Health, readiness and Prometheus metrics endpoints."""

from __future__ import annotations

from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily


def healthz(request: HttpRequest) -> JsonResponse:
    """The process is alive (no dependency checked)."""
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> JsonResponse:
    """The database and the broker both answer; 503 otherwise (take me out of the load balancer)."""
    checks: dict[str, str] = {}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        checks["database"] = "ok"
    except Exception as exc:  # any failure means not ready; the message says which
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        from conductor_project.celery import app

        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def _counted(name: str, documentation: str, rows, labels: list[str]) -> GaugeMetricFamily:
    """A gauge of row counts grouped by `labels` (one GROUP BY query); an empty label reads "none"."""
    from django.db.models import Count

    family = GaugeMetricFamily(name, documentation, labels=labels)
    for row in rows.values(*labels).annotate(n=Count("pk")).order_by():
        family.add_metric([row[label] or "none" for label in labels], row["n"])
    return family


class _DatabaseCollector:
    """Counts read from the database at scrape time: correct however many processes write, at
    the cost of one grouped query per family and scrape."""

    def collect(self):
        from messaging.models import DeadLetter, Message
        from reconciliation.models import Alert, Receipt

        yield _counted(
            "conductor_messages",
            "Messages by channel, provider and state.",
            Message.objects.all(),
            ["channel", "provider", "state"],
        )
        yield _counted(
            "conductor_dead_letters",
            "Parked dead letters (given up on, not replayed) by channel and error type.",
            DeadLetter.objects.filter(replayed_at__isnull=True),
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
            "Provider receipts that name no message we know.",
            Receipt.objects.filter(message__isnull=True),
            ["provider"],
        )


def metrics(request: HttpRequest) -> HttpResponse:
    registry = CollectorRegistry()
    registry.register(_DatabaseCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
