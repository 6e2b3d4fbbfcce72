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


class _MessageStateCollector:
    """Message counts by channel, provider and state, read from the database at scrape time:
    correct however many processes write, at the cost of one grouped query per scrape."""

    def collect(self):
        from django.db.models import Count

        from messaging.models import Message

        family = GaugeMetricFamily(
            "conductor_messages", "Messages by channel, provider and state.", labels=["channel", "provider", "state"]
        )
        rows = Message.objects.values("channel", "provider", "state").annotate(n=Count("pk")).order_by()
        for row in rows:
            family.add_metric([row["channel"], row["provider"] or "none", row["state"]], row["n"])
        yield family

        from messaging.models import DeadLetter

        dead_letters = GaugeMetricFamily(
            "conductor_dead_letters",
            "Parked dead letters (given up on, not replayed) by channel and error type.",
            labels=["channel", "error_type"],
        )
        parked = DeadLetter.objects.filter(replayed_at__isnull=True)
        for row in parked.values("channel", "error_type").annotate(n=Count("pk")).order_by():
            dead_letters.add_metric([row["channel"], row["error_type"]], row["n"])
        yield dead_letters

        from reconciliation.models import Receipt

        unmatched = GaugeMetricFamily(
            "conductor_receipts_unmatched", "Provider receipts that name no message we know.", labels=["provider"]
        )
        for row in Receipt.objects.filter(message__isnull=True).values("provider").annotate(n=Count("pk")).order_by():
            unmatched.add_metric([row["provider"]], row["n"])
        yield unmatched


def metrics(request: HttpRequest) -> HttpResponse:
    registry = CollectorRegistry()
    registry.register(_MessageStateCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
