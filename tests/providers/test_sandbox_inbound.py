"""The sandbox plays a recipient texting our number: POST /_sandbox/inbound posts the provider's
signed inbound webhook to Conductor (here Django's live server, over real HTTP) and answers with
what Conductor answered."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests as http
from django.utils import timezone

from messaging.models import InboundMessage, Suppression
from providers.conf import providers_setting
from providers.sandbox.inbound import inbound_request
from providers.sandbox.state import CONFIG_KEY
from tests.support.processes import free_port

NUMBER = "+14155552671"


@pytest.fixture
def conductor(live_server, settings, sandbox):
    """Conductor's web at live_server, and the inbound URLs the sandbox posts to."""
    settings.CONDUCTOR = {**settings.CONDUCTOR, "PUBLIC_URL": live_server.url, "RECEIPTS_URL": ""}
    return live_server.url


def inbound(sandbox, conductor, provider, body, **fields):
    """The sandbox's answer; `url` defaults to Conductor's inbound URL of the provider."""
    payload = {"provider": provider, "from": NUMBER, "body": body, **fields}
    payload.setdefault("url", f"{conductor}/webhooks/{provider}/inbound/")
    return http.post(f"{sandbox.url}/_sandbox/inbound", json=payload, timeout=30)


@pytest.fixture
def sent(make_message):
    def send(channel="sms"):
        at = timezone.now() - timedelta(minutes=5)
        return make_message(to=NUMBER, channel=channel, state="dispatched", dispatched_at=at, created_at=at)

    return send


@pytest.mark.django_db(transaction=True)
def test_a_twilio_stop_from_the_sandbox_suppresses_the_number(sandbox, conductor, sent, client_key):
    sent()
    answer = inbound(sandbox, conductor, "twilio", "STOP")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["status"] == 200 and result["content_type"].startswith("text/xml")
    assert result["params"]["From"] == NUMBER and result["params"]["To"] == "+15005550006"  # our number
    assert result["params"]["SmsStatus"] == "received" and result["params"]["MessageSid"].startswith("SM")
    suppression = Suppression.objects.get()
    assert (suppression.client, suppression.address, suppression.reason) == (client_key[0], NUMBER, "stop_keyword")
    assert InboundMessage.objects.get().provider_message_id == result["params"]["MessageSid"]


@pytest.mark.django_db(transaction=True)
def test_a_twilio_help_from_the_sandbox_shows_conductors_twiml(sandbox, conductor, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SMS_HELP_REPLY": "Acme: reply STOP to end."}
    result = inbound(sandbox, conductor, "twilio", "Help").json()
    assert result["status"] == 200
    assert "<Response><Message>Acme: reply STOP to end.</Message></Response>" in result["body"]


@pytest.mark.django_db(transaction=True)
def test_a_twilio_whatsapp_stop_from_the_sandbox(sandbox, conductor, sent, client_key):
    sent("whatsapp")
    result = inbound(sandbox, conductor, "twilio", "stop", channel="whatsapp").json()
    assert result["status"] == 200
    assert result["params"]["From"] == f"whatsapp:{NUMBER}" and result["params"]["To"] == "whatsapp:+14155238886"
    assert Suppression.objects.get().channel == "whatsapp"


@pytest.mark.django_db(transaction=True)
def test_a_vonage_stop_then_start_from_the_sandbox(sandbox, conductor, sent, client_key):
    sent()
    result = inbound(sandbox, conductor, "vonage", "STOP").json()
    assert result["status"] == 204
    assert result["params"]["msisdn"] == NUMBER.removeprefix("+") and result["params"]["type"] == "text"
    assert "sig" not in result["params"]  # signed, but the signature is not echoed
    assert Suppression.objects.get(lifted_at__isnull=True).source == "vonage inbound"
    assert inbound(sandbox, conductor, "vonage", "start").json()["status"] == 204
    assert not Suppression.objects.filter(lifted_at__isnull=True).exists()


def test_the_default_url_is_conductors_public_url_and_the_default_to_our_number(sandbox_server):
    # The sandbox's config is made from the settings at its start: CONDUCTOR_PUBLIC_URL's inbound URL.
    config = sandbox_server.app[CONFIG_KEY]
    url, params, headers = inbound_request({"provider": "vonage", "from": NUMBER, "body": "STOP"}, config)
    assert url == providers_setting("PUBLIC_URL").rstrip("/") + "/webhooks/vonage/inbound/"
    assert params["to"] == "12015550123"  # the configured sender is a name: the sandbox's number
    assert "sig" in params and headers["Content-Type"] == "application/x-www-form-urlencoded"
    url, params, _ = inbound_request({"provider": "twilio", "from": NUMBER, "to": "+15005550001"}, config)
    assert url.endswith("/webhooks/twilio/inbound/") and params["To"] == "+15005550001" and params["Body"] == ""


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"provider": "mailgun", "from": NUMBER}, "provider"),
        ({"provider": "twilio"}, "from"),
        ({"provider": "twilio", "from": "4155552671"}, "from"),
        ({"provider": "twilio", "from": NUMBER, "body": 7}, "body"),
        ({"provider": "twilio", "from": NUMBER, "body": "x" * 1601}, "body"),
        ({"provider": "vonage", "from": NUMBER, "channel": "whatsapp"}, "channel"),
        ({"provider": "twilio", "from": NUMBER, "to": ""}, "to"),
        ({"provider": "twilio", "from": NUMBER, "url": "ftp://x"}, "url"),
        ({"provider": "twilio", "from": NUMBER, "sender": "x"}, "sender"),
    ],
)
def test_a_bad_control_request_is_400_naming_the_field(sandbox_server, payload, field):
    answer = http.post(f"{sandbox_server.url}/_sandbox/inbound", json=payload, timeout=10)
    assert answer.status_code == 400 and answer.json()["field"] == field, answer.text


def test_a_body_that_is_no_json_object_is_400(sandbox_server):
    for raw in (b"{nope", b"[1]", b"\xff"):
        answer = http.post(f"{sandbox_server.url}/_sandbox/inbound", data=raw, timeout=10)
        assert answer.status_code == 400, raw


def test_an_unreachable_webhook_is_502_naming_the_url(sandbox_server):
    url = f"http://127.0.0.1:{free_port()}/webhooks/twilio/inbound/"
    payload = {"provider": "twilio", "from": NUMBER, "body": "STOP", "url": url}
    answer = http.post(f"{sandbox_server.url}/_sandbox/inbound", json=payload, timeout=30)
    assert answer.status_code == 502 and answer.json()["url"] == url
