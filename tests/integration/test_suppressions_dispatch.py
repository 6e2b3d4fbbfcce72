"""Issue 22's promise on the live stack: a recipient who texts STOP to the Twilio number is never
sent another (non-exempt) message of that client by Twilio *or* Vonage, with Twilio's circuit open
so every message would fall back, and with the STOP arriving while a message waits for its retry;
an exempt category still goes, another client is not affected, START re-subscribes."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
import requests

from messaging.models import ApiClient, Message, Suppression
from messaging.services import api_key_create
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


def text(live, body: str) -> dict:
    """The recipient texts `body` to the Twilio number (the sandbox posts Twilio's signed inbound webhook)."""
    response = requests.post(
        f"{live.sandbox_url}/_sandbox/inbound", json={"provider": "twilio", "from": NUMBER, "body": body}, timeout=30
    )
    assert response.status_code == 200 and response.json()["status"] == 200, response.text
    return response.json()


def open_twilio_circuit(live) -> None:
    breaker = CircuitBreaker("twilio", CircuitSettings(), client=live.state_redis())
    for _ in range(CircuitSettings().window_size):
        permit = breaker.allow(priority="bulk")
        if permit is not None:
            breaker.record(permit, failed=True, duration_s=0.01)
    assert breaker.state() == "open"


def test_a_texted_stop_keeps_the_client_from_twilio_and_vonage_even_mid_retry_until_start(live):
    acme, acme_key = api_key_create(client_name="acme")
    _, globex_key = api_key_create(client_name="globex")
    ApiClient.objects.filter(pk=acme.client_id).update(opt_out_exempt_categories=["otp"])
    # acme's earlier message makes the STOP acme's (the client that last sent to the number).
    wait_for_all([post(live, acme_key)], {"delivered"}, timeout=30)

    # Twilio down with its circuit open: every message of the number would fall back to Vonage.
    # Vonage fails too at first, so this one waits for its retry.
    live.sandbox_faults("twilio", outage=True)
    live.sandbox_faults("vonage", error_rate=1.0)
    open_twilio_circuit(live)
    waiting = post(live, acme_key)
    wait_until(
        lambda: Message.objects.filter(pk=waiting, failed_rounds__gte=1).exists(),
        30,
        interval=0.2,
        what="the message waiting for its retry",
    )
    assert live.sandbox_requests(message_id=waiting, provider="vonage", accepted="true") == []

    # The recipient texts STOP while it waits; Vonage is healthy again and would take it.
    assert "<Response" in text(live, "Stop")["body"]
    stopped_at = time.time()
    suppression = Suppression.objects.get(client_id=acme.client_id, channel="sms", address=NUMBER)
    assert (suppression.reason, suppression.scope, suppression.lifted_at) == ("stop_keyword", "", None)
    live.sandbox_faults("vonage", error_rate=0.0)
    wait_for_all([waiting], {"failed"}, timeout=60)
    message = Message.objects.get(pk=waiting)
    assert message.last_error_type == "suppressed", message.last_error_message
    after = [r for r in live.sandbox_requests(message_id=waiting) if received_at(r) >= stopped_at]
    assert after == [], after

    # Later messages of acme: a non-exempt one reaches no provider; its exempt code goes (Vonage).
    later, code = post(live, acme_key), post(live, acme_key, category="otp", body="Your code is 123456")
    wait_for_all([later], {"failed"}, timeout=30)
    wait_for_all([code], {"delivered"}, timeout=30)
    assert Message.objects.get(pk=later).last_error_type == "suppressed"
    assert live.sandbox_requests(message_id=later) == []
    assert Message.objects.get(pk=code).provider == "vonage"
    # START re-subscribes (acme's: its code was the last message to the number): Twilio back,
    # acme's next message is delivered again.
    text(live, "START")
    suppression.refresh_from_db()
    assert suppression.lifted_at is not None and suppression.lifted_reason
    live.sandbox_faults("twilio", outage=False)
    again = post(live, acme_key)
    wait_for_all([again], {"delivered"}, timeout=60)

    # Another client is not affected by acme's list: suppressed for acme again, globex's goes.
    text(live, "STOP")
    assert Suppression.objects.filter(client_id=acme.client_id, lifted_at__isnull=True).count() == 1
    live.sandbox_faults("twilio", opted_out=[])  # Twilio's own list is per sender: not globex's number
    other = post(live, globex_key)
    wait_for_all([other], {"delivered"}, timeout=30)
    assert not Suppression.objects.filter(client__name="globex").exists()
    stopped = [later, waiting]
    assert not [r for r in live.sandbox_requests(provider="vonage", accepted="true") if r["message_id"] in stopped]
