"""WhatsApp's customer-service window: recorded from the inbound webhook, enforced at dispatch (a
free-form message outside it is never handed to a provider: it falls back, or fails at once as
outside_session_window), a template always sent; a 63016 receipt means the same (sandbox over HTTP)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests as http
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.models import WhatsAppSession
from messaging.receipts import receipt_record
from messaging.whatsapp_session import whatsapp_session_record, whatsapp_sessions_open
from providers.registry import get_provider
from providers.types import ReceiptEvent
from tests.support.signed_inbound import TWILIO_INBOUND_PATH, twilio_inbound

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"
TEMPLATE = "HX" + "0123456789abcdef" * 2
SMS = {"fallback_channels": ["sms"], "fallback_to": {"sms": NUMBER}}


@pytest.fixture(autouse=True)
def routes(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio"], "whatsapp": ["twilio"], "email": ["mailgun"]},
    }


def dispatch(*messages):
    messages_dispatch(message_ids=[str(message.pk) for message in messages])
    for message in messages:
        message.refresh_from_db()
    return messages[0]


def hops(message):
    return list(message.attempts.order_by("number").values_list("provider", "outcome", "note"))


def recipient_writes(client, sandbox, number=NUMBER):
    """The recipient sends our WhatsApp number a message: Twilio (the sandbox) has it, and its
    webhook reaches Conductor (the Django test client, signed as Twilio signs it)."""
    # The sandbox posts its own copy of the webhook somewhere harmless: only its window matters here.
    payload = {"provider": "twilio", "channel": "whatsapp", "from": number, "url": f"{sandbox.url}/_sandbox/healthz"}
    http.post(f"{sandbox.url}/_sandbox/inbound", json=payload, timeout=5).raise_for_status()
    params, headers = twilio_inbound("hello", sender=number, to="+14155238886", whatsapp=True)
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 200


# --- the window, recorded ------------------------------------------------------------------------
def test_an_inbound_whatsapp_message_opens_the_window_and_an_sms_does_not(client):
    params, headers = twilio_inbound("hello", sender="+14155550100")
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 200
    assert not WhatsAppSession.objects.exists()
    params, headers = twilio_inbound("hello", sender=NUMBER, whatsapp=True)
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 200
    session = WhatsAppSession.objects.get()
    assert session.address == NUMBER and timezone.now() - session.last_inbound_at < timedelta(seconds=5)


def test_a_late_older_inbound_never_moves_the_window_back():
    now = timezone.now()
    whatsapp_session_record(address=NUMBER, at=now)
    whatsapp_session_record(address=NUMBER, at=now - timedelta(hours=3))
    assert WhatsAppSession.objects.get().last_inbound_at == now
    whatsapp_session_record(address=NUMBER, at=now + timedelta(minutes=1))
    assert WhatsAppSession.objects.get().last_inbound_at == now + timedelta(minutes=1)


def test_the_window_lasts_the_setting_s_hours(settings):
    now = timezone.now()
    whatsapp_session_record(address=NUMBER, at=now - timedelta(hours=23))
    whatsapp_session_record(address="+14155550100", at=now - timedelta(hours=25))
    assert whatsapp_sessions_open(addresses=[NUMBER, "+14155550100", "+14155550101"], now=now) == {NUMBER}
    settings.CONDUCTOR = {**settings.CONDUCTOR, "WHATSAPP_SESSION_WINDOW_HOURS": 12}
    assert whatsapp_sessions_open(addresses=[NUMBER], now=now) == set()
    settings.CONDUCTOR = {**settings.CONDUCTOR, "WHATSAPP_SESSION_WINDOW_HOURS": 0}  # not enforced
    assert whatsapp_sessions_open(addresses=[NUMBER], now=now) == {NUMBER}


# --- the window, enforced --------------------------------------------------------------------------
def test_free_form_outside_the_window_fails_at_once_and_reaches_no_provider(sandbox, make_message):
    message = dispatch(make_message(channel="whatsapp", body="Your table is ready"))
    assert message.state == "failed" and message.last_error_type == "outside_session_window"
    assert "send a template or wait for the recipient to write" in message.last_error_message
    assert message.next_attempt_at is None and message.lease_expires_at is None  # no retry
    assert hops(message) == [("twilio", "skipped", "skipped: outside the WhatsApp session window")]
    assert sandbox.requests() == []
    assert messages_dispatch(message_ids=[str(message.pk)]) == 0  # failed: never claimed again


def test_free_form_outside_the_window_falls_back_to_sms(sandbox, make_message):
    message = dispatch(make_message(channel="whatsapp", body="Your table is ready", **SMS))
    assert message.state == "dispatched"
    assert hops(message) == [
        ("twilio", "skipped", "skipped: outside the WhatsApp session window"),
        ("twilio", "accepted", "fallback after twilio (outside_session_window)"),
    ]
    [request] = sandbox.requests()
    assert (request["channel"], request["to"], request["body"]) == ("sms", NUMBER, "Your table is ready")


def test_free_form_inside_the_window_is_sent_free_form(client, sandbox, make_message):
    recipient_writes(client, sandbox)
    message = dispatch(make_message(channel="whatsapp", body="Your table is ready"))
    assert message.state == "dispatched"
    [request] = sandbox.requests()
    assert (request["to"], request["body"], request["fault"]) == (f"whatsapp:{NUMBER}", "Your table is ready", "none")
    assert "content_sid" not in request


def test_a_template_is_sent_outside_the_window_with_its_variables(sandbox, make_message):
    message = dispatch(
        make_message(channel="whatsapp", body="", template=TEMPLATE, template_variables={"1": "Ada", "2": "12:30"})
    )
    assert message.state == "dispatched"
    [request] = sandbox.requests()
    assert (request["to"], request["content_sid"], request["content_variables"]) == (
        f"whatsapp:{NUMBER}",
        TEMPLATE,
        {"1": "Ada", "2": "12:30"},
    )
    assert request["body"] is None and request["fault"] == "none"


def test_a_batch_reads_every_window_in_one_query(client, sandbox, make_message):
    recipient_writes(client, sandbox)
    inside = make_message(channel="whatsapp", priority="bulk")
    outside = [make_message(channel="whatsapp", to=f"+1415555{i:04d}", priority="bulk") for i in range(5)]
    with CaptureQueriesContext(connection) as queries:
        dispatch(inside, *outside)
    assert sum("messaging_whatsappsession" in q["sql"] for q in queries.captured_queries) == 1
    assert inside.state == "dispatched"
    assert all(m.state == "failed" and m.last_error_type == "outside_session_window" for m in outside)
    assert [r["to"] for r in sandbox.requests()] == [f"whatsapp:{NUMBER}"]


def test_a_closed_window_is_not_enforced_when_the_setting_is_0(settings, sandbox, make_message):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "WHATSAPP_SESSION_WINDOW_HOURS": 0}
    sandbox.faults(whatsapp_session_hours=0)  # a sender exempt from the rule, on both sides
    assert dispatch(make_message(channel="whatsapp")).state == "dispatched"


def test_a_63016_receipt_fails_the_message_as_outside_session_window(sandbox, make_message):
    # Conductor believed the window open (its webhook saw a message Twilio's window does not count,
    # or the clocks differ): the sandbox, like Twilio, accepts the message, then fails it with 63016.
    whatsapp_session_record(address=NUMBER, at=timezone.now())
    sandbox.faults(receipt_delay_ms=0)
    message = dispatch(make_message(channel="whatsapp"))
    assert message.state == "dispatched"
    [request] = sandbox.requests()
    assert (request["accepted"], request["fault"]) == (True, "outside_session_window")
    status = get_provider("twilio").fetch_status(message.provider_message_id)
    assert status.provider_status == "failed"
    # Its status callback, as the webhook would store it (Conductor's web does not run here).
    receipt_record(
        event=ReceiptEvent(
            provider="twilio",
            event_id=f"{message.provider_message_id}:failed",
            provider_message_id=message.provider_message_id,
            provider_status="failed",
            state="failed",
            message_id=str(message.pk),
            error_code="63016",
        )
    )
    message.refresh_from_db()
    assert message.state == "failed"
    assert (message.last_error_type, message.last_error_code) == ("outside_session_window", "63016")


def test_another_failed_receipt_is_still_rejected(sandbox, make_message):
    sandbox.faults(receipt_status="failed")
    message = dispatch(make_message(channel="sms"))
    receipt_record(
        event=ReceiptEvent(
            provider="twilio",
            event_id=f"{message.provider_message_id}:failed",
            provider_message_id=message.provider_message_id,
            provider_status="failed",
            state="failed",
            message_id=str(message.pk),
            error_code="30008",
        )
    )
    message.refresh_from_db()
    assert (message.state, message.last_error_type) == ("failed", "rejected")
