"""The dashboard's data endpoint and page: what each series holds, the windows, who may see it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.urls import reverse
from django.utils import timezone

from messaging.models import DispatchAttempt
from reconciliation import histograms
from reconciliation.anomalies import DetectorSettings, floor_time
from reconciliation.buckets import ROLLUP_SECONDS, buckets_refresh
from reconciliation.dashboard import dashboard_data
from reconciliation.models import Alert, DeliveryBucket, QueueDepth
from reconciliation.queues import queue_depth_sample, queue_depths

pytestmark = pytest.mark.django_db

SETTINGS = DetectorSettings()


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_user("ops", password="pw-for-tests", is_staff=True))
    return client


def sent(make_message, accepted_at, dispatched_after_s, delivered_after_s=None, **fields):
    values = {
        "state": "dispatched",
        "provider": "twilio",
        "provider_message_id": "SM",
        "accepted_at": accepted_at,
        "created_at": accepted_at,
        "dispatched_at": accepted_at + timedelta(seconds=dispatched_after_s),
    }
    if delivered_after_s is not None:
        values.update(state="delivered", delivered_at=accepted_at + timedelta(seconds=delivered_after_s))
    return make_message(**{**values, **fields})


def index_of(data, moment):
    return data["times"].index(int(floor_time(moment, data["step_seconds"]).timestamp()))


def test_series_hold_the_delivery_rate_latency_quantiles_and_error_rate(make_message):
    now = timezone.now()
    minute = floor_time(now - timedelta(minutes=4), 60)  # old enough to be mature, young enough to recount
    at = minute + timedelta(seconds=5)
    for _ in range(3):
        sent(make_message, at, 0.3, 4.0)  # critical: dispatched in (0.25, 0.5], delivered in (2.5, 5]
    sent(make_message, at, 0.3, priority="bulk")  # never receipted
    sent(make_message, at, 20.0, channel="email", provider="mailgun", priority="bulk", to="a@example.com")
    message = make_message()
    for number, outcome, error_type in ((1, "transient_error", "provider_5xx"), (2, "accepted", "")):
        DispatchAttempt.objects.create(
            message=message, number=number, provider="twilio", channel="sms", started_at=at, ended_at=at,
            outcome=outcome, error_type=error_type, latency_ms=100,
        )  # fmt: skip
    buckets_refresh(now=now, settings=SETTINGS)

    data = dashboard_data(window="1h", now=now)
    i = index_of(data, at)
    assert len(data["times"]) == 60 and data["step_seconds"] == 60
    assert data["delivery_rate"]["sms"][i] == pytest.approx(3 / 4)
    assert data["delivery_rate"]["email"][i] == 0.0
    assert data["delivery_rate"]["whatsapp"][i] is None  # nothing sent: no rate, not zero
    assert data["error_rate"] == {"provider_5xx": [None] * i + [0.5] + [None] * (59 - i)}
    assert 0.25 <= data["latency"]["dispatch"]["p50"][i] <= 0.5
    assert 10 <= data["latency"]["dispatch"]["p99"][i] <= 30  # the slow email
    assert 2.5 <= data["latency"]["delivery"]["p50"][i] <= 5
    # One priority at a time: bulk alone has the slow email at its p99 and no deliveries.
    bulk = dashboard_data(window="1h", priority="bulk", now=now)
    assert 10 <= bulk["latency"]["dispatch"]["p99"][i] <= 30 and bulk["latency"]["delivery"]["p50"][i] is None
    critical = dashboard_data(window="1h", priority="critical", now=now)
    assert critical["latency"]["dispatch"]["p99"][i] <= 0.5


def test_a_cohort_too_young_for_its_receipts_has_no_delivery_rate_yet(make_message):
    now = timezone.now()
    sent(make_message, now - timedelta(seconds=30), 0.1)
    buckets_refresh(now=now, settings=SETTINGS)
    data = dashboard_data(window="15m", now=now)
    i = index_of(data, now - timedelta(seconds=30))
    assert data["dispatched"]["sms"][i] == 1 and data["delivery_rate"]["sms"][i] is None


def test_hour_buckets_are_the_sum_of_their_minutes_and_serve_the_long_windows(make_message):
    now = timezone.now()
    hour = floor_time(now - timedelta(hours=2), ROLLUP_SECONDS)
    for minute in (1, 17, 59):
        at = hour + timedelta(minutes=minute, seconds=3)
        sent(make_message, at, 0.2, 3.0)
        sent(make_message, at, 0.7)
    # Refreshed as the clock passed each of those minutes, as beat would.
    for minute in (1, 17, 59):
        buckets_refresh(now=hour + timedelta(minutes=minute, seconds=30), settings=SETTINGS)
    buckets_refresh(now=now, settings=SETTINGS)
    rolled = DeliveryBucket.objects.get(seconds=ROLLUP_SECONDS, start=hour)
    minutes = DeliveryBucket.objects.filter(
        country="", seconds=SETTINGS.bucket_seconds, start__gte=hour, start__lt=hour + timedelta(hours=1)
    )
    assert rolled.dispatched == sum(m.dispatched for m in minutes) == 6
    assert rolled.delivered == sum(m.delivered for m in minutes) == 3
    assert rolled.dispatch_latency["critical"] == histograms.merged(m.dispatch_latency["critical"] for m in minutes)

    for window, points in (("24h", 24), ("7d", 168)):
        data = dashboard_data(window=window, now=now)
        assert len(data["times"]) == points and data["step_seconds"] == 3600
        i = index_of(data, hour)
        assert (data["dispatched"]["sms"][i], data["delivery_rate"]["sms"][i]) == (6, 0.5)


def test_dead_letters_are_counted_per_step_and_channel(park):
    now = timezone.now()
    park(parked_at=now - timedelta(minutes=3))
    park(parked_at=now - timedelta(minutes=3))
    park(parked_at=now - timedelta(minutes=3), channel="email", to="a@example.com")
    park(parked_at=now - timedelta(hours=3))  # outside the hour
    data = dashboard_data(window="1h", now=now)
    i = index_of(data, now - timedelta(minutes=3))
    assert data["dead_letters"]["sms"][i] == 2 and data["dead_letters"]["email"][i] == 1
    assert sum(data["dead_letters"]["sms"]) == 2
    assert sum(dashboard_data(window="24h", now=now)["dead_letters"]["sms"]) == 3


def test_queue_samples_keep_the_deepest_value_per_minute_and_hour():
    now = timezone.now().replace(second=10)
    queue_depth_sample(now=now, depths={"sms.bulk": 40, "sms.critical": 0})
    queue_depth_sample(now=now + timedelta(seconds=15), depths={"sms.bulk": 90, "sms.critical": 2})
    queue_depth_sample(now=now + timedelta(seconds=30), depths={"sms.bulk": 10, "sms.critical": 1})
    minute = QueueDepth.objects.get(seconds=60)
    assert minute.depths == {"sms.bulk": 90, "sms.critical": 2} and minute.samples == 3
    assert QueueDepth.objects.get(seconds=3600).depths == {"sms.bulk": 90, "sms.critical": 2}
    data = dashboard_data(window="15m", now=now + timedelta(seconds=40))
    assert data["queue_depth"]["sms.bulk"][-1] == 90 and data["queue_depth"]["email.bulk"][-1] is None


def test_queue_depth_is_read_from_the_real_broker():
    from conductor_project.celery import app

    with app.connection_for_write() as connection:
        for name in ("sms.bulk", "email.critical"):
            connection.default_channel.queue_purge(name)
        for _ in range(3):
            app.send_task("messaging.dispatch", args=["not-a-message"], queue="sms.bulk", connection=connection)
        try:
            depths = queue_depths()
            assert depths["sms.bulk"] == 3 and depths["email.critical"] == 0
            assert set(depths) == {q.name for q in app.conf.task_queues}
        finally:
            connection.default_channel.queue_purge("sms.bulk")


def test_circuits_alerts_and_the_last_run_are_included():
    now = timezone.now()
    Alert.objects.create(
        kind="receipt_rate_drop", channel="sms", provider="twilio", severity="critical", observed=0.8,
        baseline=0.99, recent_samples=500, baseline_samples=5000, score=9.0, window_start=now,
        window_end=now, opened_at=now, last_seen_at=now,
    )  # fmt: skip
    data = dashboard_data(window="15m", now=now)
    assert [c["provider"] for c in data["circuits"]] == ["twilio", "vonage", "mailgun", "smtp"]
    assert {c["state"] for c in data["circuits"]} == {"closed"}
    assert [(a["kind"], a["channel"]) for a in data["alerts"]] == [("receipt_rate_drop", "sms")]
    assert data["last_reconciliation"] is None


def test_the_endpoint_names_a_bad_field(staff):
    response = staff.get(reverse("dashboard-data"), {"window": "2d"})
    assert response.status_code == 400 and "window" in response.json()
    response = staff.get(reverse("dashboard-data"), {"priority": "urgent"})
    assert response.status_code == 400 and "priority" in response.json()
    assert staff.get(reverse("dashboard-data"), {"window": "7d", "priority": "bulk"}).status_code == 200


def test_staff_see_the_page_with_its_assets(staff):
    response = staff.get(reverse("dashboard"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "uPlot.iife.min.js" in html and "dashboard.js" in html and 'id="chart-latency"' in html


@pytest.mark.parametrize("name", ["dashboard", "dashboard-data"])
def test_anonymous_and_non_staff_users_are_sent_to_log_in(client, name):
    response = client.get(reverse(name))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    client.force_login(User.objects.create_user("outsider", password="pw-for-tests"))
    response = client.get(reverse(name))
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_suppressed_messages_are_counted_in_the_window_by_stage(api, client_key, park, monkeypatch):
    from messaging.suppressions.services import suppression_add

    monkeypatch.setattr("messaging.ingest.messages_publish", lambda **kwargs: None)
    suppression_add(client=client_key[0], channel="sms", address="+14155552671", reason="stop_keyword")
    for _ in range(2):
        api.post("/api/v1/messages/", {"channel": "sms", "to": "+14155552671", "body": "hi"}, format="json")
    park(error_type="suppressed", state="failed")  # a dispatch-time refusal (no hop left)
    park(error_type="provider_5xx")  # not a suppression
    park(error_type="suppressed", state="failed", parked_at=timezone.now() - timedelta(hours=3))  # outside
    assert dashboard_data(window="1h")["suppressed"] == {"acceptance": 2, "dispatch": 1}
    assert dashboard_data(window="24h")["suppressed"] == {"acceptance": 2, "dispatch": 2}
