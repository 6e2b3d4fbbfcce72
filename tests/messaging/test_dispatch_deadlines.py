"""The send path and a close deadline (docs/deadlines.md): a hop whose provider's shortest validity
is more than the time left is skipped like a suppressed one; a message no hop can take in time
expires without a provider request (sandbox over HTTP)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from providers.guards import circuit_breaker

pytestmark = pytest.mark.django_db


def route(settings, *providers):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {"sms": list(providers), "email": ["mailgun"]}}


def hops(message):
    return list(message.attempts.order_by("number").values_list("provider", "outcome", "note"))


def dispatch(message):
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    return message


def left(seconds: float):
    return timezone.now() + timedelta(seconds=seconds)


def test_vonage_only_with_ten_seconds_left_expires_and_nothing_is_sent(sandbox, make_message, settings):
    route(settings, "vonage")
    message = dispatch(make_message(expires_at=left(10)))
    assert message.state == "expired" and message.last_error_type == "expired"
    assert message.last_error_code == "below_minimum_validity"
    assert "below vonage's minimum validity of 20s" in message.last_error_message
    [(provider, outcome, note)] = hops(message)
    assert (provider, outcome) == ("vonage", "skipped") and "minimum validity of 20s" in note
    assert message.lease_expires_at is None and message.next_attempt_at is None
    assert message.events.filter(to_state="expired", detail__startswith="deadline too close: ").exists()
    assert sandbox.requests() == []
    assert messages_dispatch(message_ids=[str(message.pk)]) == 0  # expired: never claimed again


def test_twilio_then_vonage_with_ten_seconds_left_goes_to_twilio(sandbox, make_message, settings):
    route(settings, "twilio", "vonage")
    message = dispatch(make_message(expires_at=left(10)))
    assert message.state == "dispatched" and message.provider == "twilio"
    [sent] = sandbox.requests(message_id=str(message.pk))
    assert sent["provider"] == "twilio" and 8 <= int(sent["validity_period"]) <= 9  # rounded down from < 10 s


def test_vonage_then_twilio_with_ten_seconds_left_skips_vonage_for_twilio(sandbox, make_message, settings):
    route(settings, "vonage", "twilio")
    message = dispatch(make_message(expires_at=left(10)))
    assert message.state == "dispatched" and message.provider == "twilio"
    assert [(p, o) for p, o, _ in hops(message)] == [("vonage", "skipped"), ("twilio", "accepted")]
    assert hops(message)[1][2] == "fallback after vonage (expired)"
    assert [r["provider"] for r in sandbox.requests()] == ["twilio"]


def test_vonage_with_a_minute_left_gets_the_ttl_left(sandbox, make_message, settings):
    route(settings, "vonage")
    message = dispatch(make_message(expires_at=left(60)))
    assert message.state == "dispatched" and message.provider == "vonage"
    [sent] = sandbox.requests(message_id=str(message.pk))
    assert 55_000 <= int(sent["ttl"]) < 60_000


def test_a_failed_hop_and_a_hop_too_short_wait_for_the_retry_not_expire(sandbox, make_message, settings):
    """Twilio may still take it at the retry; only when no hop can does the deadline end it."""
    route(settings, "twilio", "vonage")
    sandbox.faults("twilio", error_rate=1.0)
    message = dispatch(make_message(expires_at=left(10)))
    assert message.state == "accepted" and message.next_attempt_at is not None
    assert message.last_error_type == "provider_5xx"
    assert [(p, o) for p, o, _ in hops(message)] == [("twilio", "transient_error"), ("vonage", "skipped")]
    assert sandbox.requests(provider="vonage") == []


def test_in_a_batch_only_the_short_ones_expire(sandbox, make_message, settings):
    route(settings, "vonage")
    short = [make_message(expires_at=left(10), to=f"+1415555{2600 + i}") for i in range(3)]
    long = [make_message(expires_at=left(300), to=f"+1415555{2700 + i}") for i in range(3)]
    messages_dispatch(message_ids=[str(m.pk) for m in short + long])
    for message in short:
        message.refresh_from_db()
        assert message.state == "expired"
    for message in long:
        message.refresh_from_db()
        assert message.state == "dispatched"
    assert {r["message_id"] for r in sandbox.requests()} == {str(m.pk) for m in long}


def test_skipping_a_hop_for_time_costs_no_query_per_message(sandbox, make_message, settings):
    """The check reads the message's deadline and the provider's class: the skipped hops' attempt
    rows go in one statement per round, however many messages they are."""
    route(settings, "vonage", "twilio")

    def queries(size, seconds_left):
        messages = [make_message(expires_at=left(seconds_left), to=f"+1415555{2600 + i}") for i in range(size)]
        with CaptureQueriesContext(connection) as captured:
            messages_dispatch(message_ids=[str(m.pk) for m in messages])
        assert {m.provider for m in messages for m in [type(m).objects.get(pk=m.pk)]} == (
            {"twilio"} if seconds_left < 20 else {"vonage"}
        )
        return len(captured)

    assert queries(8, 10) - queries(8, 300) == queries(2, 10) - queries(2, 300)


def test_time_run_out_while_waiting_for_its_turn_in_the_round_is_not_sent_and_expires(sandbox, make_message, settings):
    """The hop is checked when the round starts; the adapter checks again when it prepares the
    request. One send at a time, each answered after 0.6 s: the second of two messages with 20.3 s
    left reaches prepare() with under Vonage's 20 s, and is neither sent nor held against Vonage."""
    route(settings, "vonage")
    settings.CONDUCTOR = {**settings.CONDUCTOR, "BULK_SEND_CONCURRENCY": 1}
    sandbox.faults("vonage", latency_ms=600)
    messages = [make_message(expires_at=left(20.3), to=f"+1415555{2800 + i}") for i in range(2)]
    messages_dispatch(message_ids=[str(m.pk) for m in messages])
    for message in messages:
        message.refresh_from_db()
    [sent] = [m for m in messages if m.state == "dispatched"]
    [late] = [m for m in messages if m.state == "expired"]
    assert [r["message_id"] for r in sandbox.requests()] == [str(sent.pk)]
    assert late.last_error_code == "below_minimum_validity"
    assert [(p, o) for p, o, _ in hops(late)] == [("vonage", "transient_error")]
    assert late.attempts.get().error_type == "expired"
    circuit = circuit_breaker("vonage").snapshot()
    assert (circuit["window_calls"], circuit["window_failures"]) == (1, 0)  # the one real call only
