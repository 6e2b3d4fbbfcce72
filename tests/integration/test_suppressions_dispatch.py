"""The live stack keeps a suppressed number from every provider, fallback included (issue 22)."""

from __future__ import annotations

import time
from datetime import datetime

import pytest

from messaging.models import Message
from messaging.services import api_key_create
from messaging.suppressions.services import suppression_add
from providers.circuit import CircuitBreaker, CircuitSettings
from tests.integration.test_dispatch_flow import wait_for_all
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

NUMBER = "+14155550199"


def received_at(entry) -> float:
    return datetime.fromisoformat(entry["received_at"].replace("Z", "+00:00")).timestamp()


def post(live, key: str, **fields) -> str:
    item = {"channel": "sms", "to": NUMBER, "body": "Your order shipped", "priority": "transactional", **fields}
    response = live.api(key).post(f"{live.web_url}/api/v1/messages/", json=item, timeout=10)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_a_stop_while_twilios_circuit_is_open_keeps_the_message_from_vonage(live):
    key, raw = api_key_create(client_name="acme")
    client = key.client
    # Twilio down with its circuit open: without the check, every message of the number falls
    # back to Vonage. Vonage fails too at first, so the message waits for its retry.
    live.sandbox_faults("twilio", outage=True)
    live.sandbox_faults("vonage", error_rate=1.0)
    breaker = CircuitBreaker("twilio", CircuitSettings(open_seconds=5), client=live.state_redis())
    for _ in range(CircuitSettings().window_size):
        permit = breaker.allow(priority="bulk")
        if permit is not None:
            breaker.record(permit, failed=True, duration_s=0.01)
    assert breaker.state() == "open"

    waiting = post(live, raw)
    wait_until(
        lambda: Message.objects.filter(pk=waiting, failed_rounds__gte=1).exists(),
        30,
        interval=0.2,
        what="the message waiting for its retry",
    )
    assert [r["accepted"] for r in live.sandbox_requests(message_id=waiting, provider="vonage")] == [False]

    # The recipient opts out while it waits; Vonage is healthy again and would take it.
    suppression_add(client=client, channel="sms", address=NUMBER, reason="stop_keyword", source="test")
    stopped_at = time.time()
    live.sandbox_faults("vonage", error_rate=0.0)
    wait_for_all([waiting], {"failed"}, timeout=60)
    message = Message.objects.get(pk=waiting)
    assert message.last_error_type == "suppressed", message.last_error_message
    after = [r for r in live.sandbox_requests(message_id=waiting) if received_at(r) >= stopped_at]
    assert after == [], after
    assert not live.sandbox_requests(message_id=waiting, accepted="true")

    # A new message to the number (stopped at acceptance or at dispatch) reaches no provider
    # either, while another number of the same client still goes through Vonage.
    later, other = post(live, raw), post(live, raw, to="+14155550198")
    wait_for_all([later], {"failed"}, timeout=30)
    wait_for_all([other], {"delivered"}, timeout=30)
    assert live.sandbox_requests(message_id=later) == []
    assert Message.objects.get(pk=other).provider == "vonage"
