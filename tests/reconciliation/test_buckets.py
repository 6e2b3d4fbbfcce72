"""Delivery buckets recounted from message and attempt rows: cohorts, maturity, errors, latency."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.lookup import LOOKUP_NOTE
from messaging.models import AttemptOutcome, DispatchAttempt, Message
from reconciliation import buckets
from reconciliation.anomalies import DetectorSettings, floor_time
from reconciliation.buckets import buckets_refresh, series_by_route
from reconciliation.histograms import BOUNDS
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
    assert buckets_refresh(settings=SETTINGS) == 4  # sms and whatsapp, each for all and for the US
    sms = DeliveryBucket.objects.filter(country="", seconds=SETTINGS.bucket_seconds).get(channel="sms", start=minute)
    assert (sms.dispatched, sms.receipted, sms.delivered, sms.undelivered) == (7, 4, 3, 1)
    whatsapp = DeliveryBucket.objects.filter(country="", seconds=SETTINGS.bucket_seconds).get(channel="whatsapp")
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
    bucket = DeliveryBucket.objects.filter(country="", seconds=SETTINGS.bucket_seconds).get(start=minute)
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
    bucket = DeliveryBucket.objects.filter(country="", seconds=SETTINGS.bucket_seconds).get()
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
    assert DeliveryBucket.objects.filter(country="", seconds=SETTINGS.bucket_seconds).get(start=long_ago).receipted == 1


def test_the_series_groups_buckets_by_channel_and_provider(make_message, minute):
    sent(make_message, minute + timedelta(seconds=1))
    sent(make_message, minute + timedelta(seconds=2), provider="vonage")
    buckets_refresh(settings=SETTINGS)
    series = series_by_route(now=timezone.now(), settings=SETTINGS)
    assert set(series) == {
        ("sms", "twilio", ""),
        ("sms", "vonage", ""),
        ("sms", "twilio", "US"),
        ("sms", "vonage", "US"),
    }
    assert series[("sms", "twilio", "")].totals(minute, minute + timedelta(minutes=1)).dispatched == 1


def test_a_latency_exactly_on_a_bound_counts_in_that_bounds_slot(make_message, minute):
    at = minute + timedelta(seconds=10)
    on_bound = at - timedelta(seconds=0.1)
    sent(make_message, at, accepted_at=on_bound, state="delivered", delivered_at=on_bound + timedelta(seconds=1))
    sent(make_message, at, accepted_at=on_bound - timedelta(microseconds=1))
    sent(make_message, at, accepted_at=at + timedelta(seconds=1))  # clocks apart: counted as no wait
    buckets_refresh(settings=SETTINGS)
    bucket = DeliveryBucket.objects.filter(country="", seconds=SETTINGS.bucket_seconds).get(start=minute)
    dispatch, delivery = bucket.dispatch_latency["critical"], bucket.delivery_latency["critical"]
    assert (dispatch[0], dispatch[BOUNDS.index(0.1)], dispatch[BOUNDS.index(0.1) + 1]) == (1, 1, 1)
    assert delivery[BOUNDS.index(1.0)] == 1 and sum(delivery) == 1


# Shared calling codes (+1: US and Canada, +44: the UK and Jersey), single-country ones (+33,
# +49), a non-geographic one (+800) and a number phonenumbers cannot place.
NUMBERS = (
    "+14155552671", "+16135550123", "+447700900123", "+447797712345", "+33612345678", "+4915112345678",
    "+80012345678", "+999123",
)  # fmt: skip


def test_the_database_counts_as_the_row_by_row_count_does(client_key, minute):
    """PostgreSQL's GROUP BY counts against the Python loop SQLite uses, on varied rows: receipts
    either side of the window's edges, latencies on a bound and a microsecond off, blank
    channels and error types, look-ups, calls that never ended."""
    rng = random.Random(3)
    us = timedelta(microseconds=1)
    edges = (timedelta(seconds=-60), timedelta(seconds=-60) - us, timedelta(seconds=120), timedelta(seconds=120) + us)

    def latency():
        return timedelta(seconds=rng.choice(BOUNDS)) + rng.choice((timedelta(0), us, -us, timedelta(seconds=-3)))

    def receipt(dispatched_at, accepted_at):
        return rng.choice(
            (None, None, dispatched_at + rng.choice(edges), accepted_at + latency(), dispatched_at + latency())
        )

    messages = []
    for number in range(300):
        created_at = minute - timedelta(minutes=rng.randrange(0, 5))
        accepted_at = rng.choice((None, created_at + timedelta(microseconds=rng.randrange(10**6))))
        dispatched_at = (accepted_at or created_at) + latency()
        messages.append(
            Message(
                client=client_key[0], channel=rng.choice(("sms", "whatsapp")), to=rng.choice(NUMBERS), body="x",
                priority=rng.choice(("critical", "bulk")), state="dispatched",
                provider=rng.choice(("twilio", "vonage", "")), provider_message_id=f"SM{number}",
                expires_at=minute + timedelta(days=1), created_at=created_at, accepted_at=accepted_at,
                dispatched_at=dispatched_at,
                **{name: receipt(dispatched_at, accepted_at or created_at) for name in buckets.RECEIPTS},
            )
        )  # fmt: skip
    Message.objects.bulk_create(messages)
    attempts = [
        DispatchAttempt(
            message=rng.choice(messages), number=number, provider=rng.choice(("twilio", "vonage")),
            channel=rng.choice(("", "sms", "whatsapp")), note=rng.choice(("", LOOKUP_NOTE)),
            started_at=minute, ended_at=rng.choice((None, minute + timedelta(seconds=rng.uniform(-300, 300)))),
            outcome=rng.choice(list(AttemptOutcome)), error_type=rng.choice(("", "provider_5xx")),
            latency_ms=rng.choice((None, 0, rng.randrange(10**5))),
        )
        for number in range(300)
    ]  # fmt: skip
    DispatchAttempt.objects.bulk_create(attempts)
    since = minute - timedelta(minutes=3)
    for settings, until in ((SETTINGS, None), (DetectorSettings(bucket_seconds=7), minute + timedelta(minutes=2))):
        grouped, by_row = defaultdict(buckets._empty), defaultdict(buckets._empty)
        buckets._count_cohorts_grouped(grouped, since, settings, until)
        buckets._count_countries_grouped(grouped, since, settings, until)
        buckets._count_attempts_grouped(grouped, since, settings, until)
        buckets._count_cohorts_by_row(by_row, since, settings, until)
        buckets._count_attempts_by_row(by_row, since, settings, until)
        assert len(by_row) > 10 and grouped == by_row


def test_each_destination_country_has_its_own_cohort_beside_the_provider_wide_one(make_message, minute):
    at = minute + timedelta(seconds=10)
    for to, state in (("+447400123456", "delivered"), ("+447400654321", "dispatched"), ("+33612345678", "delivered")):
        fields = {"delivered_at": at + timedelta(seconds=5)} if state == "delivered" else {}
        sent(make_message, at, to=to, state=state, **fields)
    sent(make_message, at, to="+441534712345", state="dispatched")  # +44, but Jersey
    buckets_refresh(settings=SETTINGS)
    rows = DeliveryBucket.objects.filter(seconds=SETTINGS.bucket_seconds, start=minute)
    counted = {row.country: (row.dispatched, row.receipted, row.delivered) for row in rows}
    assert counted == {"": (4, 2, 2), "GB": (2, 1, 1), "FR": (1, 1, 1), "JE": (1, 0, 0)}
    # The dashboard's hours sum the provider-wide minutes only.
    hour = DeliveryBucket.objects.get(seconds=buckets.ROLLUP_SECONDS)
    assert (hour.country, hour.dispatched) == ("", 4)


def test_a_country_key_is_a_calling_code_only_where_that_code_is_one_countrys():
    assert buckets._country("sms", "+336") == "FR"
    assert buckets._country("sms", "+491") == "DE"
    assert buckets._country("sms", "+800") == ""  # international freephone: no country
    assert buckets._country("sms", "+16135550123") == "CA"
    assert buckets._country("sms", "+14155552671") == "US"
    assert buckets._country("sms", "+447400123456") == "GB"
    assert buckets._country("sms", "+447700900123") == ""  # a drama number: no country
