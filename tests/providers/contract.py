"""The contract every provider adapter meets, run against the sandbox over real HTTP.

A provider's test module subclasses ProviderContract and supplies the fixtures `provider`,
`provider_at` (the adapter at another base URL), `signed_webhook(valid)` (a Django request as
the provider would post it) and `recipient`; `sandbox` is the control client from conftest.
Faults are set for the provider under test only. A provider that cannot do something the
contract checks (SMTP has no receipts) overrides that test with a skip that says why.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest

from messaging.send_loop import send_loop
from providers.types import (
    AmbiguousProviderError,
    PermanentProviderError,
    SendRequest,
    TransientProviderError,
    WebhookSignatureError,
)


def send_request(to: str, body: str = "contract test", channel: str = "sms") -> SendRequest:
    message_id = str(uuid.uuid4())
    return SendRequest(message_id=message_id, token=f"{message_id}.1", channel=channel, to=to, body=body)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ProviderContract:
    invalid_recipient: str  # an address the provider rejects permanently

    @pytest.fixture(params=["send", "send_async"])
    def send(self, request):
        """Each send test runs through send() and send_async() (the send path's, on its own loop,
        messaging.send_loop): both must sort errors the same way."""
        if request.param == "send":
            return lambda provider, send_request: provider.send(send_request)
        return lambda provider, send_request: send_loop().run(provider.send_async(send_request))

    def test_send_is_accepted_and_attributed(self, provider, sandbox, recipient, send):
        request = send_request(recipient)
        result = send(provider, request)
        assert result.provider_message_id
        [logged] = sandbox.requests(message_id=request.message_id)
        assert logged["accepted"] and logged["token"] == request.token and logged["to"].endswith(recipient)

    def test_a_5xx_is_transient(self, provider, sandbox, recipient, send):
        sandbox.faults(provider.name, error_rate=1.0)
        with pytest.raises(TransientProviderError) as caught:
            send(provider, send_request(recipient))
        assert caught.value.error_type == "provider_5xx"

    def test_an_outage_is_transient(self, provider, sandbox, recipient, send):
        sandbox.faults(provider.name, outage=True)
        with pytest.raises(TransientProviderError):
            send(provider, send_request(recipient))

    def test_a_429_is_transient_and_carries_retry_after(self, provider, sandbox, recipient, send):
        sandbox.faults(provider.name, rate_429=1.0)
        with pytest.raises(TransientProviderError) as caught:
            send(provider, send_request(recipient))
        assert caught.value.error_type == "rate_limited" and caught.value.retry_after == 1.0

    def test_an_invalid_recipient_is_permanent(self, provider, sandbox, send):
        with pytest.raises(PermanentProviderError) as caught:
            send(provider, send_request(self.invalid_recipient))
        assert caught.value.error_type == "invalid_recipient"

    def test_a_timeout_after_sending_is_ambiguous_and_the_look_up_finds_it(self, provider, sandbox, recipient, send):
        sandbox.faults(
            provider.name, timeout_rate=1.0, timeout_hold_ms=int(provider.config["TIMEOUT_SECONDS"] * 1000) + 1500
        )
        request = send_request(recipient, body=f"ambiguous {uuid.uuid4()}")
        with pytest.raises(AmbiguousProviderError):
            send(provider, request)
        [found] = provider.find_send(request)
        assert found.provider_message_id == sandbox.requests(message_id=request.message_id)[0]["provider_message_id"]

    def test_a_look_up_of_a_send_that_never_happened_finds_nothing(self, provider, sandbox, recipient):
        assert provider.find_send(send_request(recipient, body=f"never sent {uuid.uuid4()}")) == []

    def test_a_refused_connection_is_transient_because_nothing_was_sent(self, provider_at, recipient, send):
        provider = provider_at(f"http://127.0.0.1:{closed_port()}")
        with pytest.raises(TransientProviderError) as caught:
            send(provider, send_request(recipient))
        assert caught.value.error_type == "connection_error"

    def test_status_look_up_follows_the_receipt(self, provider, sandbox, recipient):
        sandbox.faults(provider.name, receipt_delay_ms=0)
        result = provider.send(send_request(recipient))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            status = provider.fetch_status(result.provider_message_id)
            if status.state == "delivered":
                break
            time.sleep(0.05)
        assert status.state == "delivered"

    def test_a_signed_webhook_parses_and_a_forged_one_is_refused(self, provider, signed_webhook):
        [event] = provider.parse_webhook(signed_webhook(valid=True))
        assert event.provider == provider.name and event.state == "delivered" and event.event_id
        with pytest.raises(WebhookSignatureError):
            provider.parse_webhook(signed_webhook(valid=False))
