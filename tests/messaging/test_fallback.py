"""Walking the route: provider fallback, channel fallback, open circuits, rate limits (sandbox over HTTP)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from providers.guards import circuit_breaker, rate_limiter, reset_guards

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def routes(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun"]},
    }


def hops(message):
    return list(message.attempts.order_by("number").values_list("provider", "outcome"))


def dispatch(message):
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    return message


def test_a_transient_failure_moves_to_the_next_provider_at_once(sandbox, make_message):
    sandbox.faults("twilio", error_rate=1.0)
    message = dispatch(make_message())
    assert message.state == "dispatched" and message.provider == "vonage"
    assert hops(message) == [("twilio", "transient_error"), ("vonage", "accepted")]
    assert "fallback after twilio (provider_5xx)" in message.attempts.get(provider="vonage").note
    assert message.failed_rounds == 0 and message.next_attempt_at is None


def test_an_open_circuit_is_skipped_without_a_call(sandbox, make_message):
    breaker = circuit_breaker("twilio")
    for _ in range(10):
        breaker.record(breaker.allow(priority="bulk"), failed=True, duration_s=0.01)
    assert breaker.state() == "open"
    message = dispatch(make_message())
    assert hops(message) == [("twilio", "skipped"), ("vonage", "accepted")]
    assert sandbox.requests(provider="twilio") == []


def test_when_every_sms_provider_fails_the_fallback_channel_delivers(sandbox, make_message):
    sandbox.faults("twilio", outage=True)
    sandbox.faults("vonage", outage=True)
    message = dispatch(
        make_message(fallback_channels=["email"], fallback_to={"email": "ada@example.com"}, body="Code 123456")
    )
    assert message.state == "dispatched" and message.provider == "mailgun"
    assert hops(message) == [("twilio", "transient_error"), ("vonage", "transient_error"), ("mailgun", "accepted")]
    [email] = sandbox.requests(provider="mailgun")
    assert email["to"] == "ada@example.com" and email["message_id"] == str(message.pk)


def test_when_every_hop_fails_the_message_waits_and_spends_one_round(sandbox, make_message):
    sandbox.faults("twilio", error_rate=1.0)
    sandbox.faults("vonage", error_rate=1.0)
    message = dispatch(make_message())
    assert message.state == "accepted" and message.failed_rounds == 1 and message.next_attempt_at
    assert hops(message) == [("twilio", "transient_error"), ("vonage", "transient_error")]


def test_a_round_where_every_circuit_was_open_spends_no_budget(sandbox, make_message):
    for name in ("twilio", "vonage"):
        breaker = circuit_breaker(name)
        for _ in range(10):
            breaker.record(breaker.allow(priority="bulk"), failed=True, duration_s=0.01)
    before = timezone.now()
    message = dispatch(make_message())
    assert message.state == "accepted" and message.failed_rounds == 0 and message.next_attempt_at
    # No point asking before a circuit lets a trial through (open for 30 s).
    assert message.next_attempt_at >= before + timedelta(seconds=29)
    assert message.last_error_type == "circuit_open"
    assert hops(message) == [("twilio", "skipped"), ("vonage", "skipped")]
    assert sandbox.requests() == []


def test_an_ambiguous_send_never_falls_back_to_another_provider(sandbox, make_message):
    sandbox.faults("twilio", timeout_rate=1.0, timeout_hold_ms=4000)
    message = dispatch(make_message())
    assert message.state == "accepted" and message.needs_provider_lookup
    assert hops(message) == [("twilio", "ambiguous")]
    assert sandbox.requests(provider="vonage") == []  # a second provider would make it a duplicate


def test_a_rate_limited_provider_reschedules_without_spending_budget(sandbox, make_message, settings):
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"].update(RATE_LIMIT_PER_SECOND=0.1, RATE_LIMIT_BURST=1, RATE_LIMIT_MAX_INLINE_WAIT_SECONDS=0.5)
    settings.CONDUCTOR_PROVIDERS = providers
    reset_guards()
    first, second = make_message(), make_message()
    assert dispatch(first).state == "dispatched"
    second = dispatch(second)
    assert second.state == "accepted" and second.failed_rounds == 0 and not second.attempts.exists()
    assert second.next_attempt_at is not None  # its slot, ~10 s later
    assert len(sandbox.requests(provider="twilio")) == 1


def test_a_429_slows_the_provider_down_for_every_worker(sandbox, make_message, settings):
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"].update(RATE_LIMIT_PER_SECOND=100, RATE_LIMIT_MAX_INLINE_WAIT_SECONDS=0.0)
    settings.CONDUCTOR_PROVIDERS = providers
    reset_guards()
    sandbox.faults("twilio", rate_429=1.0)
    first = dispatch(make_message())
    assert hops(first) == [("twilio", "transient_error"), ("vonage", "accepted")]
    assert rate_limiter("twilio").acquire() > 0.5  # Retry-After: 1 holds everyone back
