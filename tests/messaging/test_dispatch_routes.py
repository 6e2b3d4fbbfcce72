"""Dispatch follows the routes' conditions (sandbox over HTTP): a degraded or drained provider for
one country loses that country's traffic to the next provider; other countries stay."""

from __future__ import annotations

from collections import Counter

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from messaging.dispatch import messages_dispatch
from messaging.models import DispatchAttempt, Message
from messaging.route_health import provider_route_set

pytestmark = pytest.mark.django_db

US = "+14155552671"
GB = "+447400123456"


@pytest.fixture(autouse=True)
def routes(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun"]},
        "ROUTE_PROBE_SHARE": 0.05,
    }


def dispatch_all(messages: list[Message]) -> Counter:
    messages_dispatch(message_ids=[str(m.pk) for m in messages])
    rows = Message.objects.filter(pk__in=[m.pk for m in messages])
    assert set(rows.values_list("state", flat=True)) == {"dispatched"}
    return Counter(rows.values_list("provider", flat=True))


def test_a_degraded_provider_for_one_country_sends_that_country_elsewhere_but_a_probe_share(sandbox, make_message):
    provider_route_set(
        provider="twilio", country="US", condition="degraded", reason="receipts dropped", source="detector"
    )
    us = dispatch_all([make_message(to=US, priority="bulk") for _ in range(200)])
    assert us["vonage"] >= 180, us  # at least 90 %
    assert us["twilio"] >= 1, us  # bulk keeps probing it (5 %): its receipts can show recovery
    gb = dispatch_all([make_message(to=GB, priority="bulk") for _ in range(50)])
    assert gb == {"twilio": 50}
    # Nothing was tried twice: one attempt per message, on the provider it went to.
    assert DispatchAttempt.objects.count() == 250
    notes = set(DispatchAttempt.objects.filter(provider="vonage").values_list("note", flat=True))
    assert notes == {"first choice, ahead of twilio (routing conditions and weights)"}
    assert set(DispatchAttempt.objects.filter(provider="twilio").values_list("note", flat=True)) == {"first choice"}


def test_critical_messages_never_probe_a_degraded_provider(sandbox, make_message):
    provider_route_set(provider="twilio", condition="degraded", reason="receipts dropped", source="detector")
    assert dispatch_all([make_message(to=US, priority="critical") for _ in range(40)]) == {"vonage": 40}


def test_a_drained_provider_gets_nothing_while_another_can_take_it(sandbox, make_message):
    provider_route_set(provider="twilio", condition="drained", reason="maintenance", source="operator:ops")
    assert dispatch_all([make_message(to=US, priority="bulk") for _ in range(40)]) == {"vonage": 40}
    assert sandbox.requests(provider="twilio") == []


def test_the_fallback_still_reaches_a_drained_provider_when_the_others_fail(sandbox, make_message):
    provider_route_set(provider="twilio", condition="drained", reason="maintenance", source="operator:ops")
    sandbox.faults("vonage", error_rate=1.0)
    message = make_message(to=US)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched" and message.provider == "twilio"
    attempts = list(message.attempts.order_by("number").values_list("provider", "outcome"))
    assert attempts == [("vonage", "transient_error"), ("twilio", "accepted")]


def test_an_unknown_outcome_is_looked_up_at_the_provider_that_had_it_whatever_the_order_now(sandbox, make_message):
    sandbox.faults("twilio", timeout_rate=1.0, timeout_hold_ms=4000)
    message = make_message(to=US)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.needs_provider_lookup and message.provider == "twilio"
    # Now twilio is drained: the look-up still asks twilio (which had it), not vonage.
    provider_route_set(provider="twilio", condition="drained", reason="maintenance", source="operator:ops")
    sandbox.faults("twilio")
    Message.objects.filter(pk=message.pk).update(next_attempt_at=None)
    messages_dispatch(message_ids=[str(message.pk)])
    lookup = message.attempts.filter(note__startswith="look-up").get()
    assert lookup.provider == "twilio"


def test_weights_split_the_first_place(sandbox, make_message):
    provider_route_set(provider="twilio", weight=1, reason="split", source="operator:ops")
    provider_route_set(provider="vonage", weight=1, reason="split", source="operator:ops")
    split = dispatch_all([make_message(to=US, priority="bulk") for _ in range(200)])
    assert 70 <= split["twilio"] <= 130 and split["twilio"] + split["vonage"] == 200, split


def test_a_claim_of_many_messages_reads_the_routes_once_and_not_again_within_the_cache(sandbox, make_message):
    provider_route_set(provider="twilio", country="US", condition="degraded", reason="dropping", source="detector")
    messages = [make_message(to=US, priority="bulk") for _ in range(30)] + [make_message(to=GB) for _ in range(10)]
    with CaptureQueriesContext(connection) as first:
        messages_dispatch(message_ids=[str(m.pk) for m in messages])
    with CaptureQueriesContext(connection) as second:
        messages_dispatch(message_ids=[str(make_message(to=US).pk)])
    reads = [q["sql"] for q in first.captured_queries if 'FROM "messaging_providerroute"' in q["sql"]]
    assert len(reads) == 1, reads
    assert not [q for q in second.captured_queries if 'FROM "messaging_providerroute"' in q["sql"]]
