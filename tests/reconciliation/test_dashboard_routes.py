"""Routes on the dashboard (not healthy now, the last changes) and in /metrics."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.urls import reverse

from conductor_project import metrics
from messaging.route_health import provider_route_set
from reconciliation.dashboard import dashboard_data

pytestmark = pytest.mark.django_db


@pytest.fixture
def routes():
    provider_route_set(
        provider="twilio", country="US", condition="degraded", reason="receipts dropped", source="detector"
    )
    provider_route_set(provider="vonage", weight=2, reason="split", source="operator:ops")
    provider_route_set(provider="mailgun", condition="drained", reason="maintenance", source="operator:ops")
    provider_route_set(provider="mailgun", condition="healthy", reason="done", source="operator:ops")


def test_the_dashboard_lists_routes_not_healthy_and_the_last_changes(routes, client):
    data = dashboard_data(window="15m")["routes"]
    assert [(r["provider"], r["country"], r["condition"], r["source"]) for r in data["not_healthy"]] == [
        ("twilio", "US", "degraded", "detector")
    ]
    assert [(c["provider"], c["from_condition"], c["to_condition"], c["reason"]) for c in data["changes"]] == [
        ("mailgun", "drained", "healthy", "done"),
        ("mailgun", "healthy", "drained", "maintenance"),
        ("vonage", "healthy", "healthy", "split"),
        ("twilio", "healthy", "degraded", "receipts dropped"),
    ]
    client.force_login(User.objects.create_user("ops", password="pw-for-tests", is_staff=True))
    assert (
        client.get(reverse("dashboard-data"), {"window": "15m"}).json()["routes"]["not_healthy"][0]["country"] == "US"
    )
    assert 'id="routing-changes"' in client.get(reverse("dashboard")).content.decode()


def test_metrics_show_each_routes_condition_and_weight(routes, client, settings):
    settings.METRICS_TOKEN = None
    metrics.database_families_cache.clear()
    text = client.get("/metrics").content.decode()
    metrics.database_families_cache.clear()
    assert 'conductor_route_condition{condition="degraded",country="US",provider="twilio"} 1.0' in text
    assert 'conductor_route_condition{condition="healthy",country="US",provider="twilio"} 0.0' in text
    assert 'conductor_route_condition{condition="healthy",country="all",provider="mailgun"} 1.0' in text
    assert 'conductor_route_weight{country="all",provider="vonage"} 2.0' in text
