"""The suppression list's rules: what a suppression covers, and one query for a whole batch."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from messaging.models import ApiClient, Suppression
from messaging.suppressions.selectors import SuppressionIndex, suppression_address, suppression_blocking
from messaging.suppressions.services import suppression_add, suppression_lift, suppressions_lift_matching

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"


@pytest.fixture
def acme():
    return ApiClient.objects.create(name="acme")


def blocked(client, category="", channel="sms", address=NUMBER):
    return suppression_blocking(client_id=client.pk, channel=channel, address=address, category=category)


def test_adding_is_idempotent_per_channel_address_and_scope(acme):
    first, created = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    again, created_again = suppression_add(client=acme, channel="sms", address=" +1 415 555 2671 ", reason="manual")
    assert created and not created_again and again.pk == first.pk and again.reason == "stop_keyword"
    scoped, created_scoped = suppression_add(
        client=acme, channel="sms", address=NUMBER, reason="unsubscribed", scope="marketing"
    )
    assert created_scoped and scoped.pk != first.pk
    assert Suppression.objects.filter(client=acme).count() == 2


def test_a_stop_covers_every_category_but_the_clients_exempt_ones(acme, settings):
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    assert blocked(acme, "marketing") and blocked(acme, "") and blocked(acme, "otp")
    acme.opt_out_exempt_categories = ["otp"]
    acme.save()
    assert blocked(acme, "marketing") and blocked(acme, "otp") is None
    acme.opt_out_exempt_categories = []
    acme.save()
    settings.CONDUCTOR = {**settings.CONDUCTOR, "OPT_OUT_EXEMPT_CATEGORIES": ["2fa"]}  # the default list
    assert blocked(acme, "2fa") is None and blocked(acme, "otp")


def test_an_address_that_cannot_receive_stops_the_exempt_categories_too(acme):
    acme.opt_out_exempt_categories = ["otp"]
    acme.save()
    suppression_add(client=acme, channel="email", address="Ada@Example.com", reason="hard_bounce")
    assert blocked(acme, "otp", channel="email", address="ada@example.com").reason == "hard_bounce"


def test_a_scoped_suppression_covers_its_category_only(acme):
    suppression_add(client=acme, channel="email", address="ada@example.com", reason="unsubscribed", scope="news")
    assert blocked(acme, "news", channel="email", address="ADA@example.com").scope == "news"
    assert blocked(acme, "receipts", channel="email", address="ada@example.com") is None
    assert blocked(acme, "", channel="email", address="ada@example.com") is None


def test_other_clients_and_other_channels_are_not_covered(acme):
    other = ApiClient.objects.create(name="other")
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    assert blocked(other) is None
    assert blocked(acme, channel="whatsapp") is None


def test_lifting_keeps_the_row_with_who_and_why_and_start_lifts_only_opt_outs(acme):
    stop, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    manual, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="manual", scope="promo")
    assert (
        suppressions_lift_matching(
            client=acme, channel="sms", address=NUMBER, reasons={"stop_keyword", "provider_reported"}, reason="START"
        )
        == 1
    )
    stop.refresh_from_db()
    assert stop.lifted_at and stop.lifted_reason == "START" and not stop.active
    assert blocked(acme, "") is None and blocked(acme, "promo").id == manual.pk
    assert suppression_lift(suppression=manual, reason="asked by phone", by="ops@acme") is True
    assert suppression_lift(suppression=manual, reason="again") is False
    # Added again after a lift: a new row, the history kept.
    again, created = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    assert created and again.pk != stop.pk and Suppression.objects.count() == 3


def test_a_batch_is_checked_in_one_query(acme):
    suppression_add(client=acme, channel="sms", address="+14155550001", reason="stop_keyword")
    triples = [(acme.pk, "sms", f"+1415555{n:04d}") for n in range(500)] + [(acme.pk, "email", "a@example.com")]
    with CaptureQueriesContext(connection) as queries:
        index = SuppressionIndex.load(triples)
    assert len(queries) == 2  # the suppressions, then (only because one matched) the clients' exemptions
    hits = [t for t in triples if index.blocking(client_id=t[0], channel=t[1], address=t[2], category="")]
    assert hits == [(acme.pk, "sms", "+14155550001")]
    with CaptureQueriesContext(connection) as queries:
        assert not SuppressionIndex.load([(acme.pk, "sms", "+14155559999")])
    assert len(queries) == 1


@pytest.mark.parametrize(
    ("channel", "given", "kept"),
    [
        ("sms", "+14155552671", "+14155552671"),
        ("sms", "+1 (415) 555-2671", "+14155552671"),
        ("whatsapp", "whatsapp:+14155552671", "+14155552671"),
        ("email", " Ada@Example.COM ", "ada@example.com"),
    ],
)
def test_addresses_are_kept_in_one_form(channel, given, kept):
    assert suppression_address(channel, given) == kept
