"""Every channel and provider end to end through a real worker, the sandbox and the webhooks."""

from __future__ import annotations

import pytest

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
    message = send(channel="whatsapp", to="whatsapp:+14155552671", body="Your table is ready")
    wait_for_all([message.pk], {"read"}, timeout=30)
    message.refresh_from_db()
    assert message.provider == "twilio" and message.read_at
    [logged] = live.sandbox_requests(message_id=str(message.pk))
    assert logged["to"] == "whatsapp:+14155552671" and logged["channel"] == "whatsapp"
    assert timeline(message) == ["accepted", "dispatched", "read"]
