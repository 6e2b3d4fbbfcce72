"""Twilio adapter: the shared provider contract, plus Twilio specifics (WhatsApp, status map)."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from django.test import RequestFactory
from twilio.request_validator import RequestValidator

from providers.conf import provider_config, providers_setting
from providers.registry import get_provider
from providers.twilio import TwilioProvider
from tests.providers.contract import ProviderContract, send_request


class TestTwilioContract(ProviderContract):
    invalid_recipient = "+1234"

    @pytest.fixture
    def provider(self, sandbox):
        return get_provider("twilio")

    @pytest.fixture
    def provider_at(self, sandbox):
        return lambda base_url: TwilioProvider({**provider_config("twilio"), "BASE_URL": base_url})

    @pytest.fixture
    def recipient(self):
        return "+14155552671"

    @pytest.fixture
    def signed_webhook(self, settings):
        token = settings.CONDUCTOR_PROVIDERS["twilio"]["AUTH_TOKEN"]

        def build(valid: bool):
            path = "/webhooks/twilio/?" + urlencode({"message_id": "m-1", "token": "m-1.1"})
            params = {"MessageSid": "SM123", "MessageStatus": "delivered", "To": "+14155552671"}
            url = providers_setting("PUBLIC_URL").rstrip("/") + path
            signature = RequestValidator(token if valid else "wrong").compute_signature(url, params)
            return RequestFactory().post(path, data=params, HTTP_X_TWILIO_SIGNATURE=signature)

        return build


def test_whatsapp_goes_out_with_whatsapp_addresses(sandbox):
    request = send_request("+14155552671", channel="whatsapp")
    get_provider("twilio").send(request)
    [logged] = sandbox.requests(message_id=request.message_id)
    assert logged["to"] == "whatsapp:+14155552671" and logged["channel"] == "whatsapp"


def test_the_status_map_covers_twilios_status_enum():
    import json
    from pathlib import Path

    spec_path = Path(__file__).resolve().parents[3] / "shared" / "contracts" / "twilio_api_v2010.json"
    if not spec_path.exists():
        pytest.skip("Twilio's OpenAPI description is not beside the repository")
    spec = json.loads(spec_path.read_text())
    statuses = spec["components"]["schemas"]["message_enum_status"]["enum"]
    assert set(statuses) <= set(TwilioProvider.status_map)
    assert TwilioProvider.status_map["read"] == "read"
    assert TwilioProvider.status_map["undelivered"] == "undelivered"
