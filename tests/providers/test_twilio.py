"""Twilio adapter: the shared provider contract, plus Twilio specifics (WhatsApp, status map)."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.test import RequestFactory
from django.utils import timezone
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
            ours = "0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d"
            path = "/webhooks/twilio/?" + urlencode({"message_id": ours, "token": f"{ours}.1"})
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


TEMPLATE = "HX" + "0123456789abcdef" * 2


def template_request(variables=None):
    return dataclasses.replace(
        send_request("+14155552671", body="kept for display", channel="whatsapp"),
        template=TEMPLATE,
        template_variables={"1": "Ada", "2": "12:30"} if variables is None else variables,
    )


def test_a_template_is_prepared_as_content_sid_and_variables_without_a_body():
    prepared = get_provider("twilio").prepare(template_request())
    assert prepared["ContentSid"] == TEMPLATE and "Body" not in prepared
    assert json.loads(prepared["ContentVariables"]) == {"1": "Ada", "2": "12:30"}
    assert prepared["To"] == "whatsapp:+14155552671"
    assert "ContentVariables" not in get_provider("twilio").prepare(template_request(variables={}))
    free_form = get_provider("twilio").prepare(send_request("+14155552671", body="hi", channel="whatsapp"))
    assert free_form["Body"] == "hi" and "ContentSid" not in free_form


@pytest.mark.parametrize("how", ["send", "send_async"])
def test_a_template_reaches_twilio_with_its_variables(sandbox, how):
    """Through the SDK (messages.create's content_sid, content_variables) and the bulk path's post."""
    from messaging.send_loop import send_loop

    request = template_request()
    provider = get_provider("twilio")
    provider.send(request) if how == "send" else send_loop().run(provider.send_async(request))
    [logged] = sandbox.requests(message_id=request.message_id)
    assert (logged["content_sid"], logged["content_variables"]) == (TEMPLATE, {"1": "Ada", "2": "12:30"})
    assert logged["body"] is None and logged["accepted"] and logged["fault"] == "none"  # a template: no window


def test_a_63016_receipt_means_outside_session_window():
    assert TwilioProvider.receipt_error_types["63016"] == "outside_session_window"


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


def test_the_bulk_paths_direct_post_is_the_request_the_sdk_makes(settings):
    """send_async() posts Twilio's create request through aiohttp instead of the SDK (a speed
    shortcut); it must be the SDK's request: method, path, form fields and every header the SDK sets."""
    import asyncio
    import json as jsonlib
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, dict(self.headers), parse_qs(body.decode())))
            answer = jsonlib.dumps({"sid": f"SM{len(received)}", "status": "queued"}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        provider = TwilioProvider({**provider_config("twilio"), "BASE_URL": f"http://127.0.0.1:{server.server_port}"})
        # With a deadline past Twilio's longest validity, both carry ValidityPeriod 36000.
        request = dataclasses.replace(
            send_request("+14155552671", body="same request ✓"), expires_at=timezone.now() + timedelta(hours=11)
        )
        by_sdk = provider.send(request)

        async def send_async_once():
            try:
                return await provider.send_async(request)
            finally:
                await provider.async_session.get().close()

        by_aiohttp = asyncio.run(send_async_once())
        provider.close()
    finally:
        server.shutdown()
        server.server_close()
    assert (by_sdk.provider_message_id, by_aiohttp.provider_message_id) == ("SM1", "SM2")
    (sdk_method, sdk_path, sdk_headers, sdk_form), (method, path, headers, form) = received
    assert (method, path, form) == (sdk_method, sdk_path, sdk_form)
    assert form["ValidityPeriod"] == ["36000"]
    # Every header the SDK sets itself (user agent, client, content type, accept, auth); the
    # transport's own (Host, Content-Length, Connection, Accept-Encoding) are each library's.
    sdk_set = {"User-Agent", "X-Twilio-Client", "Accept-Charset", "Content-Type", "Accept", "Authorization"}
    assert sdk_set <= set(sdk_headers)
    assert {name: headers.get(name) for name in sdk_set} == {name: sdk_headers[name] for name in sdk_set}


@pytest.mark.parametrize("how", ["send", "send_async"])
def test_an_unsubscribed_recipient_21610_is_opted_out(sandbox, how):
    """Twilio's refusal of a recipient who texted STOP: permanent, opted_out, code 21610."""
    from messaging.send_loop import send_loop
    from providers.types import PermanentProviderError

    sandbox.faults("twilio", opted_out=["+14155552672"])
    request = send_request("+14155552672")
    provider = get_provider("twilio")
    with pytest.raises(PermanentProviderError) as caught:
        provider.send(request) if how == "send" else send_loop().run(provider.send_async(request))
    assert (caught.value.error_type, caught.value.code) == ("opted_out", "21610")
    [logged] = sandbox.requests(message_id=request.message_id)
    assert (logged["accepted"], logged["fault"]) == (False, "opted_out")


def test_a_region_permission_refusal_is_not_an_invalid_recipient():
    assert TwilioProvider.error_code_types.get(21408) is None  # our account's setting: a plain rejection
    assert TwilioProvider.error_code_types[21211] == "invalid_recipient"
