"""Deadlines travel, end to end through real processes (docs/deadlines.md): API (gunicorn) ->
PostgreSQL -> Redis -> Celery worker -> Twilio SDK -> sandbox -> signed status callback. No mocks.

The issue's done-when: a critical 2FA SMS accepted with 5 minutes' TTL and sent at minute 4
carries a ValidityPeriod of at most the ~60 s left; with the sandbox holding delivery longer,
it ends `undelivered` with Twilio's validity error (30036), not `delivered`."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db.models import F

from messaging.models import Message
from messaging.services import api_key_create
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TTL_S = 300
SENT_AT_S = 240  # "sent at minute 4": the message is made four minutes old before a worker sees it
DELIVERY_HOLD_MS = 75_000  # the sandbox would deliver 75 s after acceptance: past the validity


@pytest.mark.timeout(180)
def test_a_2fa_sms_sent_at_minute_four_carries_the_minute_left_and_ends_undelivered_with_30036(live):
    key = api_key_create(client_name="acme")[1]
    live.replace_workers(count=0)  # nothing sends it while its clock is moved
    live.sandbox_faults("twilio", receipt_delay_ms=DELIVERY_HOLD_MS)
    response = live.api(key).post(
        f"{live.web_url}/api/v1/messages/",
        json={
            "channel": "sms",
            "to": "+14155552671",
            "body": "Your code is 123456",
            "priority": "critical",
            "ttl_seconds": TTL_S,
        },
        timeout=10,
    )
    assert response.status_code == 201, response.text
    message_id = response.json()["id"]
    four_minutes = timedelta(seconds=SENT_AT_S)
    moved = Message.objects.filter(pk=message_id, state="accepted").update(
        created_at=F("created_at") - four_minutes,
        accepted_at=F("accepted_at") - four_minutes,
        expires_at=F("expires_at") - four_minutes,
    )
    assert moved == 1
    live.start_worker()  # its task is waiting in the broker: sent now, at minute 4
    wait_until(
        lambda: Message.objects.filter(pk=message_id, state="dispatched").exists(), 30, what="the send at minute 4"
    )
    message = Message.objects.get(pk=message_id)
    left_at_send = (message.expires_at - message.dispatched_at).total_seconds()
    [sent] = live.sandbox_requests(message_id=message_id)
    assert sent["accepted"] and sent["provider"] == "twilio"
    validity = int(sent["validity_period"])
    # The adapter rounds down the time left when it prepares the request; dispatched_at is stamped
    # after the provider answered, so it may be a moment later than that (one run: 58 vs 57.99 s).
    assert left_at_send <= TTL_S - SENT_AT_S and validity <= TTL_S - SENT_AT_S, (validity, left_at_send)
    assert left_at_send - 10 <= validity <= left_at_send + 2, (validity, left_at_send)

    # The sandbox holds delivery for 75 s; the validity ends first and Twilio reports 30036 then.
    sent_at = time.monotonic()
    wait_until(
        lambda: Message.objects.filter(pk=message_id, state__in=["undelivered", "delivered", "failed"]).exists(),
        validity + 20,
        interval=0.5,
        what="the message's final state",
    )
    assert time.monotonic() - sent_at < DELIVERY_HOLD_MS / 1000 - 5  # ended at the validity, not the delivery
    detail = live.api(key).get(f"{live.web_url}/api/v1/messages/{message_id}/", timeout=10).json()
    assert detail["state"] == "undelivered", detail
    assert [(r["provider_status"], r["error_code"], r["mapped_state"]) for r in detail["receipts"]] == [
        ("failed", "30036", "undelivered")
    ]
    assert [e["to_state"] for e in detail["events"] if e["applied"]] == ["accepted", "dispatched", "undelivered"]
    assert any("30036" in e["detail"] for e in detail["events"] if e["to_state"] == "undelivered")
    assert detail["delivered_at"] is None
