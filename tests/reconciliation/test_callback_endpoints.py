"""Callback endpoints failing too long are disabled with an alert (their pending callbacks parked),
the alert resolves once the endpoint is enabled again; the dashboard shows the callback backlog."""

from __future__ import annotations

import base64
import json
from datetime import timedelta

import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone

from messaging.callbacks.dead_letters import callbacks_park
from messaging.callbacks.endpoints import callback_endpoint_enable
from messaging.models import Callback, CallbackEndpoint, DeadLetter
from reconciliation.callbacks import callback_endpoints_disable_failing
from reconciliation.dashboard import dashboard_data
from reconciliation.models import Alert
from reconciliation.tasks import disable_failing_callback_endpoints
from tests.support.callback_rows import callback_make, endpoint_make

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)


def test_an_endpoint_failing_past_the_limit_is_disabled_with_an_alert(
    make_message, client_key, settings, django_capture_on_commit_callbacks
):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "CALLBACK_DISABLE_AFTER_SECONDS": 6 * 3600.0,
        "ALERT_WEBHOOK_URL": "http://127.0.0.1:9/alerts",
    }
    broker = redis.Redis.from_url(django_settings.CELERY_BROKER_URL)
    broker.delete("maintenance")
    now = timezone.now()
    dead_end = endpoint_make(
        client_key[0], url="https://down.example.com/hook?token=s3cr3t", failing_since=now - 7 * HOUR
    )
    young = endpoint_make(client_key[0], url="https://flaky.example.com/hook", failing_since=now - 5 * HOUR)
    healthy = endpoint_make(client_key[0], url="https://fine.example.com/hook")
    message = make_message()
    waiting = [callback_make(message, dead_end, sequence=n) for n in (1, 2)]
    kept = callback_make(message, young, sequence=1)

    with django_capture_on_commit_callbacks(execute=True):
        report = callback_endpoints_disable_failing(now=now)
    assert (report.disabled, report.parked, report.swept) == ([dead_end.pk], 2, 0)
    dead_end.refresh_from_db()
    assert dead_end.enabled is False and dead_end.disabled_at == now and "failing since" in dead_end.disabled_reason
    assert {c.state for c in Callback.objects.filter(pk__in=[c.pk for c in waiting])} == {"dead_lettered"}
    assert set(DeadLetter.objects.filter(kind="callback").values_list("reason", flat=True)) == {"endpoint_disabled"}
    kept.refresh_from_db()
    assert kept.state == "pending" and CallbackEndpoint.objects.get(pk=young.pk).enabled
    assert CallbackEndpoint.objects.get(pk=healthy.pk).enabled

    alert = Alert.objects.get()
    assert (alert.kind, alert.channel, alert.provider, alert.recent_samples) == (
        "callback_endpoint_disabled",
        "callback",
        f"endpoint:{dead_end.pk}",
        2,
    )
    assert alert.observed == pytest.approx(7 * 3600) and alert.baseline == 6 * 3600
    assert "acme's endpoint" in alert.detail and "s3cr3t" not in alert.detail  # the URL redacted
    assert f"--endpoint {dead_end.pk}" in alert.detail
    queued = [json.loads(raw) for raw in broker.lrange("maintenance", 0, -1)]
    posts = [
        json.loads(base64.b64decode(m["body"]))[0][0]
        for m in queued
        if m["headers"]["task"] == "reconciliation.post_alert"
    ]
    assert [(p["kind"], p["event"]) for p in posts] == [("callback_endpoint_disabled", "opened")]
    assert posts[0]["detail"] == alert.detail

    # The next tick: nothing new; once enabled again, the alert resolves.
    assert callback_endpoints_disable_failing(now=now + timedelta(minutes=1)).disabled == []
    assert Alert.objects.filter(resolved_at=None).count() == 1
    callback_endpoint_enable(endpoint_id=dead_end.pk)
    report = callback_endpoints_disable_failing(now=now + timedelta(minutes=2))
    assert report.resolved == 1 and Alert.objects.get().resolved_at is not None
    assert CallbackEndpoint.objects.get(pk=dead_end.pk).failing_since is None


def test_callbacks_left_pending_for_a_disabled_endpoint_are_parked(make_message, client_key):
    """An outbox write that read the endpoint as enabled just before it was disabled."""
    endpoint = endpoint_make(client_key[0], enabled=False, disabled_at=timezone.now())
    stranded = callback_make(make_message(), endpoint)
    assert disable_failing_callback_endpoints.apply().result == 0
    stranded.refresh_from_db()
    assert stranded.state == "dead_lettered"
    assert DeadLetter.objects.get(callback=stranded).reason == "endpoint_disabled"


def test_disabled_again_while_its_alert_is_open_refreshes_it(client_key):
    now = timezone.now()
    endpoint = endpoint_make(client_key[0], failing_since=now - 25 * HOUR)
    callback_endpoints_disable_failing(now=now)
    CallbackEndpoint.objects.filter(pk=endpoint.pk).update(enabled=True)  # enabled by hand, no tick in between
    callback_endpoints_disable_failing(now=now + HOUR)
    alert = Alert.objects.get()
    assert alert.resolved_at is None and alert.last_seen_at == now + HOUR


def test_the_dashboard_shows_the_callback_backlog(make_message, client_key):
    now = timezone.now()
    slow = endpoint_make(client_key[0], url="https://slow.example.com/hook", failing_since=now - HOUR)
    quick = endpoint_make(client_key[0], url="https://quick.example.com/hook")
    endpoint_make(
        client_key[0], url="https://off.example.com/hook", enabled=False, disabled_at=now, disabled_reason="x"
    )
    message = make_message()
    callback_make(message, slow, sequence=1, created_at=now - 10 * timedelta(minutes=1))
    callback_make(message, slow, sequence=2, created_at=now - timedelta(minutes=5))
    callback_make(message, quick, sequence=1, created_at=now - timedelta(seconds=3))
    callback_make(message, quick, sequence=2, state="delivered")
    parked = callback_make(message, quick, sequence=3)
    callbacks_park(callback_ids=[parked.pk], reason="refused: 404", now=now)
    Callback.objects.filter(endpoint=slow, sequence=2).update(next_attempt_at=now + HOUR)

    backlog = dashboard_data(window="15m", now=now)["callbacks"]
    assert (backlog["pending"], backlog["dead"], backlog["disabled_count"]) == (3, 1, 1)
    rows = [(e["url"], e["pending"], e["due"]) for e in backlog["endpoints"]]
    assert rows == [("https://slow.example.com/hook", 2, 1), ("https://quick.example.com/hook", 1, 1)]
    assert backlog["endpoints"][0]["oldest_age_seconds"] == pytest.approx(600, abs=1)
    assert backlog["endpoints"][0]["oldest_due_wait_seconds"] == pytest.approx(600, abs=1)
    assert backlog["endpoints"][0]["failing_since"] is not None and backlog["endpoints"][1]["failing_since"] is None
    assert [d["url"] for d in backlog["disabled"]] == ["https://off.example.com/hook"]
    # Dead callbacks are not counted in the message dead letters chart.
    assert sum(sum(series) for series in dashboard_data(window="15m", now=now)["dead_letters"].values()) == 0


def test_the_job_runs_on_beat():
    entry = django_settings.CELERY_BEAT_SCHEDULE["reconciliation.disable_failing_callback_endpoints"]
    assert entry["task"] == disable_failing_callback_endpoints.name and entry["schedule"] == 60.0
