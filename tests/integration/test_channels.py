"""Every channel and provider end to end through a real worker, the sandbox and the webhooks."""

from __future__ import annotations

import pytest
import requests

from messaging.models import Message
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import wait_for_all

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def send(live):
    key = api_key_create(client_name="acme")[1]

    def send_one(**fields) -> Message:
        response = live.api(key).post(f"{live.web_url}/api/v1/messages/", json=fields, timeout=10)
        assert response.status_code == 201, response.text
        return Message.objects.get(pk=response.json()["id"])

    return send_one


def timeline(message: Message) -> list[str]:
    return list(message.events.filter(applied=True).order_by("created_at", "id").values_list("to_state", flat=True))


def test_whatsapp_through_twilio_reaches_read(live, send):
    live.sandbox_faults("twilio", receipt_status="read")
    # The recipient writes first: a free-form message goes only inside their 24-hour window.
    answer = requests.post(
        f"{live.sandbox_url}/_sandbox/inbound",
        json={"provider": "twilio", "channel": "whatsapp", "from": "+14155552671", "body": "hi"},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["status"] == 200, answer.text
    message = send(channel="whatsapp", to="whatsapp:+14155552671", body="Your table is ready")
    wait_for_all([message.pk], {"read"}, timeout=30)
    message.refresh_from_db()
    assert message.provider == "twilio" and message.read_at
    [logged] = live.sandbox_requests(message_id=str(message.pk))
    assert logged["to"] == "whatsapp:+14155552671" and logged["channel"] == "whatsapp"
    # Twilio's WhatsApp callbacks: sent, delivered, read (in that order).
    assert timeline(message) == ["accepted", "dispatched", "delivered", "read"]


def test_sms_through_vonage_reaches_delivered(live, send):
    live.replace_workers(env={"CONDUCTOR_ROUTE_SMS": "vonage"})
    message = send(channel="sms", to="+14155552671", body="Your parcel is out for delivery")
    wait_for_all([message.pk], {"delivered"}, timeout=30)
    message.refresh_from_db()
    assert message.provider == "vonage"
    [logged] = live.sandbox_requests(provider="vonage", message_id=str(message.pk))
    assert logged["accepted"] and logged["token"] == message.send_token
    assert timeline(message) == ["accepted", "dispatched", "delivered"]
    # Vonage's intermediate DLR, then the final one.
    assert [r.provider_status for r in message.receipts.order_by("received_at")] == ["accepted", "delivered"]


def test_email_through_mailgun_reaches_read(live, send):
    live.sandbox_faults("mailgun", receipt_status="read")
    message = send(channel="email", to="ada@example.com", subject="Your invoice", body="Invoice attached.")
    wait_for_all([message.pk], {"read"}, timeout=30)
    message.refresh_from_db()
    assert message.provider == "mailgun" and message.read_at
    # Webhooks may race: "opened" can land first (then "delivered" is kept but moves nothing back).
    assert timeline(message) in (["accepted", "dispatched", "delivered", "read"], ["accepted", "dispatched", "read"])
    # anymail calls Mailgun's `accepted` event "queued".
    assert sorted(r.provider_status for r in message.receipts.all()) == ["delivered", "opened", "queued"]


def test_email_through_smtp_is_handed_to_the_relay(live, send):
    from tests.support.smtp_server import SmtpTestServer

    server = SmtpTestServer().start()
    try:
        live.replace_workers(env={"CONDUCTOR_ROUTE_EMAIL": "smtp", "SMTP_PORT": str(server.port)})
        message = send(channel="email", to="ada@example.com", subject="Reset your password", body="Use this link.")
        # SMTP gives no receipts: handed to the relay (dispatched) is its happy final state.
        wait_for_all([message.pk], {"dispatched"}, timeout=30)
        [received] = server.received(message_id=str(message.pk))
        assert received.header("Subject") == "Reset your password" and "Use this link." in received.body
        assert received.message_id == f"<{message.send_token}@conductor>"
        assert Message.objects.get(pk=message.pk).provider == "smtp"
    finally:
        server.stop()


def test_each_provider_webhook_refuses_a_forged_receipt_and_changes_nothing(live, send):
    live.sandbox_faults("twilio", receipt_delay_ms=60_000)
    message = send(channel="sms", to="+14155552671", body="hello")
    wait_for_all([message.pk], {"dispatched"}, timeout=30)
    forged_vonage = {
        "messageId": message.provider_message_id,
        "status": "delivered",
        "client-ref": message.send_token,
        "msisdn": "14155552671",
        "timestamp": "1700000000",
        "sig": "0" * 64,
    }
    assert requests.post(f"{live.web_url}/webhooks/vonage/", data=forged_vonage, timeout=10).status_code == 403
    assert requests.get(f"{live.web_url}/webhooks/vonage/", params=forged_vonage, timeout=10).status_code == 403
    forged_mailgun = {
        "signature": {"timestamp": "1700000000", "token": "x" * 50, "signature": "0" * 64},
        "event-data": {
            "event": "delivered",
            "id": "e1",
            "timestamp": 1700000000.0,
            "recipient": "a@example.com",
            "user-variables": {"conductor_message_id": str(message.pk)},
            "message": {"headers": {"message-id": "m@x"}},
        },
    }
    mailgun = requests.post(f"{live.web_url}/webhooks/anymail/mailgun/tracking/", json=forged_mailgun, timeout=10)
    assert mailgun.status_code == 400  # anymail's own view refuses with 400
    assert requests.post(f"{live.web_url}/webhooks/twilio/", data={"MessageSid": "SM1"}, timeout=10).status_code == 403
    assert requests.post(f"{live.web_url}/webhooks/nosuch/", data={}, timeout=10).status_code == 404
    message.refresh_from_db()
    assert message.state == "dispatched" and not message.receipts.exists()
