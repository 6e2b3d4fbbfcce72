"""Provider outages do not become customer outages: circuits, fallback, shared rate limits."""

from __future__ import annotations

import time
from collections import Counter
from datetime import datetime

import pytest

from messaging.models import DispatchAttempt, Message
from messaging.services import api_key_create
from providers.circuit import CircuitBreaker, CircuitSettings
from tests.integration.test_dispatch_flow import accepted_sends_per_message, post_batch, wait_for_all

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SMS = {"channel": "sms", "body": "Your parcel is on its way"}
MINIMUM_CALLS = CircuitSettings().minimum_calls


@pytest.fixture
def key(live):
    return api_key_create(client_name="acme")[1]


def received_at(entry) -> float:
    return datetime.fromisoformat(entry["received_at"].replace("Z", "+00:00")).timestamp()


def numbers(start: int, count: int) -> list[str]:
    return [f"+1415555{start + i:04d}" for i in range(count)]


def test_a_twilio_outage_moves_sms_to_vonage_and_bulk_messages_test_the_recovery(live, key):
    workers = 4
    live.replace_workers(count=workers, concurrency=1)
    breaker = CircuitBreaker("twilio", CircuitSettings(open_seconds=5), client=live.state_redis())
    live.sandbox_faults("twilio", outage=True)
    ids = post_batch(live, key, [{**SMS, "to": to, "priority": "transactional"} for to in numbers(6000, 120)])
    wait_for_all(ids, {"delivered"}, timeout=60)
    opened_at = breaker.snapshot()["opened_at"]
    assert opened_at, "the circuit never opened"
    to_twilio = [received_at(r) for r in live.sandbox_requests(provider="twilio")]
    before_open = [t for t in to_twilio if t <= opened_at + 1.0]
    assert len(before_open) <= MINIMUM_CALLS + workers, f"{len(before_open)} sends reached the dead provider"
    # Between one second after opening and the first half-open moment, nothing goes to twilio.
    assert not [t for t in to_twilio if opened_at + 1.0 < t < opened_at + 5.0]
    assert Counter(Message.objects.filter(pk__in=ids).values_list("provider", flat=True)) == {"vonage": 120}

    # The outage ends: keep a mix of bulk and critical traffic flowing until the circuit closes.
    live.sandbox_faults("twilio", outage=False)
    recovered_at = time.time()
    recovery_ids: list[str] = []
    deadline = time.monotonic() + 45
    wave = 0
    while breaker.state() != "closed" and time.monotonic() < deadline:
        items = [{**SMS, "to": to, "priority": "bulk"} for to in numbers(7000 + wave * 10, 5)]
        if wave:  # bulk traffic is already flowing when critical traffic joins, as in a campaign
            items += [{**SMS, "to": to, "priority": "critical"} for to in numbers(7005 + wave * 10, 5)]
        recovery_ids += post_batch(live, key, items)
        wave += 1
        time.sleep(0.5)
    assert breaker.state() == "closed", breaker.snapshot()
    print(
        f"\ntwilio outage: {len(before_open)} sends reached it before its circuit opened "
        f"(bound {MINIMUM_CALLS + workers}); closed again {time.time() - recovered_at:.1f} s after it recovered"
    )
    wait_for_all(recovery_ids, {"delivered"}, timeout=60)
    trials = (
        DispatchAttempt.objects.filter(provider="twilio", outcome="accepted", message_id__in=recovery_ids)
        .order_by("started_at")
        .values_list("message__priority", "started_at")
    )
    first_trials = [priority for priority, started in trials[:3] if started.timestamp() >= recovered_at]
    assert first_trials == ["bulk", "bulk", "bulk"], list(trials[:6])
    assert max(accepted_sends_per_message(live).values()) == 1


def test_with_both_sms_providers_down_the_email_fallback_delivers(live, key):
    live.sandbox_faults("twilio", outage=True)
    live.sandbox_faults("vonage", outage=True)
    response = live.api(key).post(
        f"{live.web_url}/api/v1/messages/",
        json={
            **SMS,
            "to": "+14155552671",
            "priority": "critical",
            "fallback_channels": ["email"],
            "fallback_to": {"email": "ada@example.com"},
        },
        timeout=10,
    )
    assert response.status_code == 201, response.text
    message_id = response.json()["id"]
    wait_for_all([message_id], {"delivered"}, timeout=30)
    message = Message.objects.get(pk=message_id)
    assert message.provider == "mailgun"
    hops = list(message.attempts.order_by("number").values_list("provider", "outcome"))
    assert hops == [("twilio", "transient_error"), ("vonage", "transient_error"), ("mailgun", "accepted")]
    [email] = live.sandbox_requests(provider="mailgun", accepted="true")
    assert email["to"] == "ada@example.com" and email["message_id"] == message_id


def test_a_rate_limited_provider_takes_a_burst_at_its_pace_without_a_429(live, key):
    live.replace_workers(env={"CONDUCTOR_ROUTE_SMS": "vonage", "VONAGE_RATE_LIMIT_PER_SECOND": "20"}, count=2)
    # The sandbox answers 429 beyond 30 sends in any second, like a real account's cap (left some
    # headroom: a send leaves a little after its reserved slot). Unthrottled, 8 worker slots would
    # send several times that.
    live.sandbox_faults("vonage", max_per_second=30)
    ids = post_batch(live, key, [{**SMS, "to": to, "priority": "bulk"} for to in numbers(8000, 400)])
    wait_for_all(ids, {"dispatched", "delivered"}, timeout=90)
    sends = live.sandbox_requests(provider="vonage")
    times = sorted(received_at(r) for r in sends)
    # The 429s first (a refused send retried later still ends accepted), then every message must
    # have its own accepted Vonage send; a message without one is reported with what it went through.
    assert [r for r in sends if r["fault"] == "rate_429"] == []
    accepted = Counter(r["message_id"] for r in sends if r["accepted"])
    missing = [
        {
            "message": Message.objects.filter(pk=pk).values("id", "state", "provider", "provider_message_id").get(),
            "attempts": list(DispatchAttempt.objects.filter(message_id=pk).values("provider", "outcome", "note")),
            "sandbox": live.sandbox_requests(message_id=pk),
        }
        for pk in ids
        if not accepted[pk]
    ]
    assert missing == [], f"{len(missing)} of 400 dispatched without an accepted Vonage send"
    assert sum(accepted.values()) == 400, {pk: n for pk, n in accepted.items() if n > 1}
    span = times[-1] - times[0]
    print(f"400 messages at a 20/s limit: {span:.1f} s at the sandbox, 0 answered 429")
    assert span >= 19.0
