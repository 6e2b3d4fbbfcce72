"""Delivery buckets recounted from message and attempt rows: cohorts, maturity, errors, latency."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.lookup import LOOKUP_NOTE
from messaging.models import DispatchAttempt
from reconciliation.anomalies import DetectorSettings, floor_time
from reconciliation.buckets import buckets_refresh, series_by_route
from reconciliation.models import DeliveryBucket

pytestmark = pytest.mark.django_db

SETTINGS = DetectorSettings()  # one-minute buckets, two-minute maturity


@pytest.fixture
def minute():
    """The start of a bucket a few minutes ago, and a clock to refresh at."""
    start = floor_time(timezone.now() - timedelta(minutes=4), 60)
    return start


def sent(make_message, at, **fields):
    values = {"state": "dispatched", "provider": "twilio", "provider_message_id": "SM", "dispatched_at": at}
    return make_message(**{**values, **fields})


def test_a_cohort_counts_receipts_only_within_the_maturity(make_message, minute):
    at = minute + timedelta(seconds=10)
    sent(make_message, at, state="delivered", delivered_at=at + timedelta(seconds=30))
    sent(make_message, at, state="read", delivered_at=at + timedelta(seconds=5), read_at=at + timedelta(seconds=9))
    sent(make_message, at, state="undelivered", undelivered_at=at + timedelta(seconds=50))
    sent(make_message, at, state="delivered", delivered_at=at + timedelta(minutes=5))  # too late to count
    sent(make_message, at)  # no receipt yet
    # A receipt that overtook our own dispatched write (a second earlier) counts; one from an
    # earlier send generation (an hour earlier) does not.
    sent(make_message, at, state="delivered", delivered_at=at - timedelta(seconds=1))
    sent(make_message, at, state="failed", failed_at=at - timedelta(hours=1))
    sent(make_message, at + timedelta(minutes=1), channel="whatsapp", state="read", read_at=at + timedelta(minutes=1))
    assert buckets_refresh(settings=SETTINGS) == 2
    sms = DeliveryBucket.objects.filter(seconds=SETTINGS.bucket_seconds).get(channel="sms", start=minute)
    assert (sms.dispatched, sms.receipted, sms.delivered, sms.undelivered) == (7, 4, 3, 1)
    whatsapp = DeliveryBucket.objects.filter(seconds=SETTINGS.bucket_seconds).get(channel="whatsapp")
    assert whatsapp.start == minute + timedelta(minutes=1) and (whatsapp.dispatched, whatsapp.delivered) == (1, 1)


def test_attempts_count_sends_errors_and_latency_but_not_look_ups(make_message, minute):
    message = make_message()
    at = minute + timedelta(seconds=20)

    def attempt(number, outcome, error_type="", latency=100, note="first choice"):
        DispatchAttempt.objects.create(
            message=message, number=number, provider="twilio", channel="sms", started_at=at, ended_at=at,
            outcome=outcome, error_type=error_type, latency_ms=latency, note=note,
        )  # fmt: skip

    attempt(1, "transient_error", "provider_5xx", 300)
    attempt(2, "transient_error", "provider_5xx", 100)
    attempt(3, "ambiguous", "provider_timeout", 3000)
    attempt(4, "accepted", latency=200)
    attempt(5, "skipped", "circuit_open", None)  # no call was made
    attempt(6, "not_found_at_provider", latency=50, note=LOOKUP_NOTE)
    buckets_refresh(settings=SETTINGS)
    bucket = DeliveryBucket.objects.filter(seconds=SETTINGS.bucket_seconds).get(start=minute)
    assert bucket.attempts == 4 and bucket.errors == {"provider_5xx": 2, "provider_timeout": 1}
    assert (bucket.latency_count, bucket.latency_sum_ms) == (4, 3600.0)
    assert bucket.latency_sumsq_ms == 300**2 + 100**2 + 3000**2 + 200**2


def test_refreshing_again_recounts_instead_of_adding(make_message, minute):
    at = minute + timedelta(seconds=10)
    message = sent(make_message, at)
    buckets_refresh(settings=SETTINGS)
    message.delivered_at, message.state = at + timedelta(seconds=20), "delivered"
    message.save()
    buckets_refresh(settings=SETTINGS)
    bucket = DeliveryBucket.objects.filter(seconds=SETTINGS.bucket_seconds).get()
    assert (bucket.dispatched, bucket.receipted, bucket.delivered) == (1, 1, 1)


def test_after_missed_runs_the_cohorts_counted_young_are_recounted(make_message):
    now = timezone.now()
    long_ago = floor_time(now - timedelta(minutes=30), 60)
    at = long_ago + timedelta(seconds=5)
    message = sent(make_message, at)
    buckets_refresh(now=at + timedelta(seconds=20), settings=SETTINGS)  # counted young: no receipt yet
    message.delivered_at, message.state = at + timedelta(seconds=40), "delivered"
    message.save()
    buckets_refresh(now=now, settings=SETTINGS)  # beat was down for half an hour
    assert DeliveryBucket.objects.filter(seconds=SETTINGS.bucket_seconds).get(start=long_ago).receipted == 1


def test_the_series_groups_buckets_by_channel_and_provider(make_message, minute):
    sent(make_message, minute + timedelta(seconds=1))
    sent(make_message, minute + timedelta(seconds=2), provider="vonage")
    buckets_refresh(settings=SETTINGS)
    series = series_by_route(now=timezone.now(), settings=SETTINGS)
    assert set(series) == {("sms", "twilio"), ("sms", "vonage")}
    assert series[("sms", "twilio")].totals(minute, minute + timedelta(minutes=1)).dispatched == 1
