"""WhatsApp's session window end to end, through the real web, a real worker and the sandbox
process: a free-form message outside the window never reaches the provider as free-form; a
template does, with its variables; once the recipient writes, free-form goes (docs/whatsapp.md)."""

from __future__ import annotations

import pytest
import requests

from messaging.models import Message, WhatsAppSession
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import wait_for_all

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

NUMBER = "+14155552671"
TEMPLATE = "HX" + "0123456789abcdef" * 2


@pytest.fixture
def send(live):
    key = api_key_create(client_name="acme")[1]

    def send_one(**fields) -> Message:
        response = live.api(key).post(f"{live.web_url}/api/v1/messages/", json=fields, timeout=10)
        assert response.status_code == 201, response.text
        return Message.objects.get(pk=response.json()["id"])

    return send_one


def test_outside_the_window_free_form_never_reaches_the_provider_and_a_template_does(live, send):
    free_form = send(channel="whatsapp", to=NUMBER, body="Your table is ready")
    template = send(channel="whatsapp", to=NUMBER, template=TEMPLATE, variables={"1": "Ada", "2": "12:30"})
    wait_for_all([free_form.pk], {"failed"}, timeout=30)
    wait_for_all([template.pk], {"delivered"}, timeout=30)
    free_form.refresh_from_db()
    assert free_form.last_error_type == "outside_session_window"
    assert "send a template or wait for the recipient to write" in free_form.last_error_message
    assert live.sandbox_requests(message_id=str(free_form.pk)) == []  # never handed to Twilio
    [logged] = live.sandbox_requests(message_id=str(template.pk))
    assert (logged["to"], logged["content_sid"], logged["content_variables"]) == (
        f"whatsapp:{NUMBER}",
        TEMPLATE,
        {"1": "Ada", "2": "12:30"},
    )
    assert logged["body"] is None  # no free-form text went
    # Every request the sandbox took for the number: the template alone.
    assert [r.get("content_sid") for r in live.sandbox_requests(to=f"whatsapp:{NUMBER}")] == [TEMPLATE]


def test_outside_the_window_free_form_falls_back_to_sms(live, send):
    message = send(
        channel="whatsapp",
        to=NUMBER,
        body="Your table is ready",
        fallback_channels=["sms"],
        fallback_to={"sms": NUMBER},
    )
    wait_for_all([message.pk], {"delivered"}, timeout=30)
    [logged] = live.sandbox_requests(message_id=str(message.pk))
    assert (logged["channel"], logged["to"], logged["body"]) == ("sms", NUMBER, "Your table is ready")


def test_after_the_recipient_writes_free_form_goes(live, send):
    answer = requests.post(
        f"{live.sandbox_url}/_sandbox/inbound",
        json={"provider": "twilio", "channel": "whatsapp", "from": NUMBER, "body": "Is my table ready?"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["status"] == 200, answer.text
    assert WhatsAppSession.objects.filter(address=NUMBER).exists()  # recorded by the inbound webhook
    message = send(channel="whatsapp", to=NUMBER, body="Yes, come in")
    wait_for_all([message.pk], {"delivered"}, timeout=30)
    [logged] = live.sandbox_requests(message_id=str(message.pk))
    assert (logged["body"], logged["fault"]) == ("Yes, come in", "none")
