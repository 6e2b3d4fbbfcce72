"""Fallback on silence end to end through real processes (docs/silence-fallback.md): API (gunicorn)
-> worker -> Twilio SDK -> sandbox, whose Twilio never sends the final receipt; the sweeper (beat,
every second here) finds the opted-in 2FA code silent after after_seconds and the worker sends its
one copy through Vonage, whose signed receipt ends it delivered. No mocks.

The issue's done-when: "Fallback on silence delivers a 2FA code through the second provider when
the first never receipts, and never for categories not opted in."
"""

from __future__ import annotations

import json
import time

import pytest
import requests

from messaging.models import Message
from messaging.services import api_key_create
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

AFTER_S = 5
SILENCE = {"CONDUCTOR_SILENCE_FALLBACK": json.dumps({"otp": {"after_seconds": AFTER_S}})}


@pytest.mark.timeout(180)
def test_a_2fa_code_twilio_never_receipts_is_delivered_through_vonage_and_no_other_category_twice(live):
    key = api_key_create(client_name="acme")[1]
    live.replace_workers(env=SILENCE)
    # Twilio takes every message and says `sent`, and never its final receipt (a silent drop).
    live.sandbox_faults("twilio", receipt_loss_rate=1.0)
    api = live.api(key)

    def send(category: str, to: str) -> str:
        response = api.post(
            f"{live.web_url}/api/v1/messages/",
            json={
                "channel": "sms",
                "to": to,
                "body": "Your code is 123456",
                "priority": "critical",
                "category": category,
            },
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()["id"]

    otp = send("otp", "+14155552671")
    other = send("login_alert", "+14155552672")
    wait_until(
        lambda: Message.objects.filter(pk__in=[otp, other], state="dispatched").count() == 2, 30, what="both dispatched"
    )
    dispatched_at = time.monotonic()

    wait_until(
        lambda: Message.objects.filter(pk=otp, state="delivered").exists(),
        AFTER_S + 30,
        interval=0.25,
        what="the 2FA code delivered through the fallback",
    )
    assert time.monotonic() - dispatched_at >= AFTER_S - 1  # not before its time
    detail = api.get(f"{live.web_url}/api/v1/messages/{otp}/", timeout=10).json()
    assert detail["state"] == "delivered" and detail["provider"] == "vonage", detail
    assert detail["silence_fallback_at"]
    sends = [(r["provider"], r["accepted"]) for r in live.sandbox_requests(message_id=otp)]
    assert sorted(sends) == [("twilio", True), ("vonage", True)]  # one copy, through the second provider
    [copy] = [a for a in detail["attempts"] if a["provider"] == "vonage"]
    assert copy["note"] == "silence fallback after twilio (silence)" and copy["outcome"] == "accepted"
    fallback = [e for e in detail["events"] if e["source"] == "fallback"]
    assert fallback and "no final receipt from twilio in time" in fallback[0]["detail"]
    assert detail["events"][-1]["to_state"] == "delivered" and "vonage receipt" in detail["events"][-1]["detail"]

    # The category not opted in: well past after_seconds and several sweeps later, still dispatched,
    # sent once, never claimed.
    time.sleep(max(0.0, AFTER_S + 4 - (time.monotonic() - dispatched_at)))
    message = Message.objects.get(pk=other)
    assert message.state == "dispatched" and message.silence_fallback_at is None and message.provider == "twilio"
    assert [r["provider"] for r in live.sandbox_requests(message_id=other)] == ["twilio"]

    metrics = requests.get(f"{live.web_url}/metrics", timeout=10).text
    assert (
        'conductor_silence_fallbacks_total{category="otp",outcome="accepted",provider="vonage",reason="silence"} 1.0'
        in metrics
    )
