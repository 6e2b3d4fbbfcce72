"""Alerts: opened from stored buckets, kept while the signal lasts, resolved on recovery, told
to the log, Sentry and a webhook (with retries)."""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from reconciliation.alerts import alert_payload, anomalies_detect
from reconciliation.anomalies import DetectorSettings, cohort_end
from reconciliation.models import Alert, DeliveryBucket
from reconciliation.tasks import post_alert
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.django_db


def store(now, *, minutes=200, drop_last=0, receipt=0.98, drop_to=0.80, provider="twilio"):
    """Steady one-minute buckets for sms via `provider`, the last `drop_last` complete cohorts dropped."""
    end = cohort_end(now, DetectorSettings())
    DeliveryBucket.objects.filter(provider=provider).delete()
    rows = []
    for i in range(minutes, 0, -1):
        rate = drop_to if i <= drop_last else receipt
        rows.append(
            DeliveryBucket(
                channel="sms", provider=provider, seconds=60, start=end - timedelta(minutes=i), dispatched=600,
                receipted=round(600 * rate), delivered=round(600 * (rate - 0.02)), updated_at=now,
            )
        )  # fmt: skip
    DeliveryBucket.objects.bulk_create(rows)


def test_a_drop_opens_an_alert_once_and_recovery_resolves_it(caplog, django_capture_on_commit_callbacks):
    now = timezone.now()
    store(now, drop_last=3)
    with (
        caplog.at_level(logging.INFO, logger="reconciliation.alerts"),
        django_capture_on_commit_callbacks(execute=True),
    ):
        report = anomalies_detect(now=now)
    assert report.opened == 2  # receipts and deliveries both dropped
    alert = Alert.objects.get(kind="receipt_rate_drop")
    assert (alert.channel, alert.provider, alert.severity) == ("sms", "twilio", "critical")
    assert alert.observed == pytest.approx(0.80, abs=0.01) and alert.baseline == pytest.approx(0.98, abs=0.01)
    assert alert.is_open and alert.recent_samples == 1200
    assert "alert opened: receipt_rate_drop on sms via twilio: 80.0% against 97.9% over 1200 samples" in caplog.text

    later = now + timedelta(minutes=1)
    assert anomalies_detect(now=later).opened == 0  # still firing: the same alert, seen again
    alert.refresh_from_db()
    assert alert.is_open and alert.last_seen_at == later and Alert.objects.count() == 2

    store(later, drop_last=0)  # the rate is back
    with caplog.at_level(logging.INFO, logger="reconciliation.alerts"):
        report = anomalies_detect(now=later)
    assert report.resolved == 2 and report.still_open == 0
    alert.refresh_from_db()
    assert alert.resolved_at == later and "alert resolved: receipt_rate_drop on sms via twilio" in caplog.text


def test_an_alert_stays_open_while_the_rate_stays_low_even_once_the_baseline_has_caught_up():
    now = timezone.now()
    store(now, drop_last=3)
    anomalies_detect(now=now)
    store(now, drop_last=200)  # hours later: the whole history is low, no fresh finding
    anomalies_detect(now=now)
    assert Alert.objects.filter(resolved_at=None).count() == 2


def test_a_channel_that_stops_sending_keeps_its_alert_open():
    now = timezone.now()
    store(now, drop_last=3)
    anomalies_detect(now=now)
    DeliveryBucket.objects.all().delete()
    anomalies_detect(now=now + timedelta(minutes=5))
    assert Alert.objects.filter(resolved_at=None).count() == 2


def test_the_webhook_receives_the_alert_as_json_and_a_5xx_is_retried(settings):
    now = timezone.now()
    store(now, drop_last=3)
    anomalies_detect(now=now)
    payload = alert_payload(Alert.objects.get(kind="receipt_rate_drop"), "opened")
    with WebhookReceiver() as receiver:
        settings.CONDUCTOR = {**settings.CONDUCTOR, "ALERT_WEBHOOK_URL": f"{receiver.base}/hooks/alerts"}
        receiver.answers = [503, 500]  # the endpoint fails twice, then takes it
        post_alert.apply(args=[payload])
        assert [call["status"] for call in receiver.calls] == [503, 500, 200]
        body = receiver.calls[-1]["body"]
    assert body["event"] == "opened" and body["kind"] == "receipt_rate_drop" and body["provider"] == "twilio"
    assert body["observed"] == pytest.approx(0.80, abs=0.01) and body["resolved_at"] is None


def test_the_webhook_urls_secret_path_never_reaches_the_logs(settings, caplog):
    import socket

    now = timezone.now()
    store(now, drop_last=3)
    anomalies_detect(now=now)
    payload = alert_payload(Alert.objects.get(kind="receipt_rate_drop"), "opened")
    secret = "T000/B000/s3cr3tT0k3n"
    with WebhookReceiver(default_status=404) as receiver, caplog.at_level(logging.DEBUG):
        settings.CONDUCTOR = {**settings.CONDUCTOR, "ALERT_WEBHOOK_URL": f"{receiver.base}/services/{secret}"}
        post_alert.apply(args=[payload])  # refused: logged, not retried
        assert [call["path"] for call in receiver.calls] == [f"/services/{secret}"]
    assert f"alert webhook {receiver.base}/… refused alert" in caplog.text

    with socket.socket() as probe:  # a port nothing listens on: connection refused, retried
        probe.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{probe.getsockname()[1]}"
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ALERT_WEBHOOK_URL": f"{down}/services/{secret}?token={secret}"}
    with caplog.at_level(logging.DEBUG):
        result = post_alert.apply(args=[payload])
    assert str(result.result) == f"{down}/… did not answer (ConnectionError)"
    assert "s3cr3t" not in caplog.text and "/services/" not in caplog.text


def test_opening_an_alert_queues_its_webhook_post_on_the_broker(settings, django_capture_on_commit_callbacks):
    import base64
    import json

    import redis

    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    broker.delete("maintenance")
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ALERT_WEBHOOK_URL": "http://127.0.0.1:9/alerts"}
    now = timezone.now()
    store(now, drop_last=3)
    with django_capture_on_commit_callbacks(execute=True):
        anomalies_detect(now=now)
    queued = [json.loads(raw) for raw in broker.lrange("maintenance", 0, -1)]
    posts = [m for m in queued if m["headers"]["task"] == "reconciliation.post_alert"]
    payloads = [json.loads(base64.b64decode(m["body"]))[0][0] for m in posts]
    assert sorted(p["kind"] for p in payloads) == ["delivery_rate_drop", "receipt_rate_drop"]
    assert all(p["event"] == "opened" for p in payloads)


def test_alerts_go_to_sentry_when_it_is_configured():
    import sentry_sdk

    events = []

    class Transport(sentry_sdk.transport.Transport):
        def capture_envelope(self, envelope):
            events.extend(item.payload.json for item in envelope.items if item.payload.json)

    sentry_sdk.init(dsn="https://key@sentry.invalid/1", transport=Transport, default_integrations=False)
    try:
        now = timezone.now()
        store(now, drop_last=3)
        from reconciliation.alerts import alert_notify

        anomalies_detect(now=now)
        alert_notify(alert=Alert.objects.get(kind="receipt_rate_drop"), event="opened")
        sentry_sdk.flush()
    finally:
        sentry_sdk.init(dsn=None)
    [event] = [e for e in events if "receipt_rate_drop" in e.get("message", "")]
    assert event["level"] == "error" and event["tags"]["conductor.provider"] == "twilio"


def test_open_alerts_are_counted_in_metrics(client):
    now = timezone.now()
    store(now, drop_last=3)
    anomalies_detect(now=now)
    page = client.get("/metrics").content.decode()
    labels = 'channel="sms",kind="receipt_rate_drop",provider="twilio",severity="critical"'
    assert f"conductor_alerts_open{{{labels}}} 1.0" in page


def test_a_second_tick_opening_the_same_alert_opens_nothing():
    from reconciliation.alerts import alert_open
    from reconciliation.anomalies import AlertKind, Finding

    now = timezone.now()
    finding = Finding(AlertKind.RECEIPT_RATE_DROP, "", 0.8, 0.98, 1200, 72000, now, now, 20.0, "critical")
    assert alert_open(channel="sms", provider="twilio", finding=finding, now=now) is not None
    assert alert_open(channel="sms", provider="twilio", finding=finding, now=now) is None  # concurrent tick
    assert Alert.objects.count() == 1
