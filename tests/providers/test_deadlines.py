"""Deadlines travel (docs/deadlines.md): each adapter gives the provider's expiry field the time
left at the moment it prepares the request, rounded down and capped; below the provider's
shortest validity it does not hand the message over; Twilio's 30036 is our `undelivered`."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.test import RequestFactory

from providers.conf import provider_config
from providers.mailgun import MailgunProvider
from providers.smtp import SmtpProvider
from providers.twilio import TwilioProvider
from providers.types import DeadlineTooShortError, ErrorType, SendRequest
from providers.vonage import VonageProvider

NOW = datetime(2026, 12, 6, 5, 0, tzinfo=UTC)


def request(left: timedelta | None, channel: str = "sms", to: str = "+14155552671") -> SendRequest:
    message_id = str(uuid.uuid4())
    return SendRequest(
        message_id=message_id,
        token=f"{message_id}.1",
        channel=channel,
        to=to,
        body="code 1",
        subject="code",
        expires_at=None if left is None else NOW + left,
    )


@pytest.fixture
def twilio():
    return TwilioProvider(provider_config("twilio"))


@pytest.fixture
def vonage():
    return VonageProvider(provider_config("vonage"))


@pytest.mark.parametrize(
    ("left", "validity_period"),
    [
        (timedelta(seconds=60), "60"),
        (timedelta(seconds=59, milliseconds=999), "59"),  # rounded down: never more than we have
        (timedelta(seconds=1), "1"),  # Twilio's shortest
        (timedelta(seconds=1, milliseconds=500), "1"),
        (timedelta(hours=10), "36000"),
        (timedelta(hours=72), "36000"),  # a longer deadline gets Twilio's longest (its default)
    ],
)
def test_twilio_validity_period_is_the_whole_seconds_left(twilio, left, validity_period):
    assert twilio.prepare(request(left), now=NOW)["ValidityPeriod"] == validity_period


def test_twilio_without_a_deadline_sends_no_validity_period(twilio):
    assert "ValidityPeriod" not in twilio.prepare(request(None), now=NOW)


@pytest.mark.parametrize("left", [timedelta(milliseconds=999), timedelta(0), timedelta(seconds=-5)])
def test_twilio_below_one_second_left_is_not_handed_over(twilio, left):
    with pytest.raises(DeadlineTooShortError) as caught:
        twilio.prepare(request(left), now=NOW)
    assert caught.value.error_type == ErrorType.EXPIRED and "twilio's minimum validity of 1s" in str(caught.value)


@pytest.mark.parametrize(
    ("left", "ttl"),
    [
        (timedelta(seconds=60), 60_000),
        (timedelta(seconds=59, microseconds=999_999), 59_999),  # rounded down to the millisecond
        (timedelta(seconds=20), 20_000),  # Vonage's shortest
        (timedelta(days=7), 604_800_000),
        (timedelta(days=30), 604_800_000),  # a longer deadline gets Vonage's longest
    ],
)
def test_vonage_ttl_is_the_milliseconds_left(vonage, left, ttl):
    assert vonage.prepare(request(left), now=NOW).ttl == ttl


def test_vonage_without_a_deadline_sends_no_ttl(vonage):
    assert vonage.prepare(request(None), now=NOW).ttl is None
    assert "ttl" not in {k for k, v in vonage.prepare(request(None), now=NOW).model_dump().items() if v is not None}


@pytest.mark.parametrize("left", [timedelta(seconds=19, milliseconds=999), timedelta(seconds=10)])
def test_vonage_below_twenty_seconds_left_is_not_handed_over(vonage, left):
    with pytest.raises(DeadlineTooShortError) as caught:
        vonage.prepare(request(left), now=NOW)
    assert "vonage's minimum validity of 20s" in str(caught.value)


def test_the_send_path_raises_it_before_any_request(sandbox):
    """send() prepares first: a message too late for the provider never reaches it."""
    vonage = VonageProvider(provider_config("vonage"))
    ten_seconds_left = request(timedelta(seconds=10) + (datetime.now(UTC) - NOW))
    with pytest.raises(DeadlineTooShortError):
        vonage.send(ten_seconds_left)
    assert sandbox.requests(provider="vonage") == []


@pytest.mark.parametrize("provider_class", [MailgunProvider, SmtpProvider])
def test_email_has_no_expiry_field_and_ignores_the_deadline(provider_class):
    assert provider_class.validity_seconds is None
    provider = provider_class(provider_config(provider_class.name))
    close = request(timedelta(milliseconds=1), channel="email", to="ada@example.com")
    assert provider.validity_left(close, now=NOW) is None
    provider.prepare(close)  # prepared all the same: no field to give it, nothing refused


def status_callback(**fields: str):
    params = {"MessageSid": "SM1", "To": "+14155552671", **fields}
    return RequestFactory().post("/webhooks/twilio/?message_id=0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d", data=params)


def test_twilio_failed_with_30036_is_undelivered_with_its_code(twilio):
    [event] = twilio.parse(status_callback(MessageStatus="failed", ErrorCode="30036"))
    assert (event.state, event.error_code, event.provider_status) == ("undelivered", "30036", "failed")


def test_twilio_failed_with_another_code_stays_failed(twilio):
    [event] = twilio.parse(status_callback(MessageStatus="failed", ErrorCode="30008"))
    assert (event.state, event.error_code) == ("failed", "30008")


def test_vonage_expired_is_undelivered():
    assert VonageProvider.status_map["expired"] == "undelivered"


def test_the_sandboxs_delivery_delay_comes_from_settings_and_survives_a_reset(settings):
    from django.core.exceptions import ImproperlyConfigured

    from providers.sandbox.settings import sandbox_config_from_settings
    from providers.sandbox.state import SandboxState

    settings.SANDBOX_DELIVERY_DELAY_MS = 75_000
    config = sandbox_config_from_settings()
    assert config.delivery_delay_ms == 75_000
    state = SandboxState(delivery_delay_ms=config.delivery_delay_ms)
    assert {faults.receipt_delay_ms for faults in state.faults.values()} == {75_000}
    state.faults["twilio"] = state.faults["twilio"].updated({"receipt_delay_ms": 10})
    state.reset()
    assert state.faults["twilio"].receipt_delay_ms == 75_000
    settings.SANDBOX_DELIVERY_DELAY_MS = -1
    with pytest.raises(ImproperlyConfigured):
        sandbox_config_from_settings()
