"""Health, readiness and Prometheus metrics endpoints, and the 404 answer."""

from __future__ import annotations

import hmac

from django.conf import settings
from django.db import DatabaseError, connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from conductor_project.celery import app
from conductor_project.metrics import metrics_registry
from reconciliation.heartbeats import periodic_jobs_check


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
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception as exc:  # any failure means not ready
        checks["broker"] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def livez_beat(request: HttpRequest) -> JsonResponse:
    """Every periodic job (the tasks beat runs: sweeper, release, polling, detection, retention...)
    succeeded recently enough; 503 naming the overdue ones (reconciliation.heartbeats).

    Not part of /readyz on purpose: a web process serves the API as well with beat stopped, and
    taking every web pod out of the load balancer for it would turn a late safety net into an
    outage. Point an uptime check (or beat's own liveness probe) here instead. Each request judges
    the heartbeats and opens or resolves their alerts: it works with beat dead."""
    try:
        statuses = periodic_jobs_check()
    except DatabaseError as exc:  # nothing can be said: not "ok"
        return JsonResponse({"status": "unknown", "error": type(exc).__name__}, status=503)
    overdue = [status.task for status in statuses if status.overdue]
    return JsonResponse(
        {
            "status": "overdue" if overdue else "ok",
            "overdue": overdue,
            "jobs": [status.as_dict(error_text=False) for status in statuses],
        },
        status=503 if overdue else 200,
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition: every process's events and the current state (conductor_project/metrics.py).

    With METRICS_TOKEN set (CONDUCTOR_METRICS_TOKEN), only for "Authorization: Bearer <token>"."""
    if settings.METRICS_TOKEN and not _bearer_matches(request, settings.METRICS_TOKEN):
        response = HttpResponse("metrics need a bearer token\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(metrics_registry()), content_type=CONTENT_TYPE_LATEST)


def _bearer_matches(request: HttpRequest, token: str) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


def not_found(request: HttpRequest, exception: Exception) -> HttpResponse:
    """404 for a URL that matches no route: JSON under /api/ (what the API's clients parse, e.g. a
    message id that is not a UUID), Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return page_not_found(request, exception)
