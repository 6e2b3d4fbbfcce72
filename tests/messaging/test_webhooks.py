"""The receipt webhook view: signed receipts apply once however often they come; forged ones change nothing."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from twilio.request_validator import RequestValidator

from messaging.models import Receipt
from messaging.receipts import receipts_apply_batch
from providers.conf import provider_config, providers_setting
from tests.providers.test_vonage import dlr, signed

pytestmark = pytest.mark.django_db


@pytest.fixture
def dispatched(make_message):
    return lambda provider, reference: make_message(
        state="dispatched", provider=provider, provider_message_id=reference
    )


def twilio_callback(client, message, status="delivered", token=None):
    path = "/webhooks/twilio/?" + urlencode({"message_id": str(message.pk), "token": message.send_token})
    params = {"MessageSid": message.provider_message_id, "MessageStatus": status, "To": message.to}
    url = providers_setting("PUBLIC_URL").rstrip("/") + path
    signature = RequestValidator(token or provider_config("twilio")["AUTH_TOKEN"]).compute_signature(url, params)
    return client.post(path, data=params, HTTP_X_TWILIO_SIGNATURE=signature)


def test_twilio_the_same_signed_callback_ten_times_applies_once(client, dispatched):
    message = dispatched("twilio", "SM42")
    codes = [twilio_callback(client, message).status_code for _ in range(10)]
    assert codes == [204] * 10
    assert Receipt.objects.get().processed_at is None  # stored, applied off the request path
    assert receipts_apply_batch().applied == 1
    message.refresh_from_db()
    assert message.state == "delivered"
    assert Receipt.objects.count() == 1 and message.events.filter(to_state="delivered").count() == 1


def test_twilio_a_forged_callback_is_403_and_stores_nothing(client, dispatched):
    message = dispatched("twilio", "SM43")
    assert twilio_callback(client, message, token="not-the-token").status_code == 403
    message.refresh_from_db()
    assert message.state == "dispatched" and not Receipt.objects.exists()


def test_vonage_the_same_signed_receipt_ten_times_applies_once(client, dispatched):
    message = dispatched("vonage", "aaaaaaaa-0000-0000-0000-000000000001")
    params = signed(
        dlr(messageId=message.provider_message_id, **{"client-ref": message.send_token}),
        provider_config("vonage")["SIGNATURE_SECRET"],
    )
    codes = [client.post("/webhooks/vonage/", data=params).status_code for _ in range(10)]
    assert codes == [204] * 10
    assert Receipt.objects.get().processed_at is None  # stored, applied off the request path
    assert receipts_apply_batch().applied == 1
    message.refresh_from_db()
    assert message.state == "delivered"
    assert Receipt.objects.count() == 1 and message.events.filter(to_state="delivered").count() == 1


def test_vonage_a_receipt_signed_with_another_secret_is_403_and_stores_nothing(client, dispatched):
    message = dispatched("vonage", "aaaaaaaa-0000-0000-0000-000000000002")
    params = signed(dlr(messageId=message.provider_message_id, **{"client-ref": message.send_token}), "wrong")
    assert client.post("/webhooks/vonage/", data=params).status_code == 403
    assert client.get("/webhooks/vonage/", params).status_code == 403
    message.refresh_from_db()
    assert message.state == "dispatched" and not Receipt.objects.exists()
