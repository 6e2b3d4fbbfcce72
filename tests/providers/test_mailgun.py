"""Mailgun adapter (django-anymail): the shared provider contract, plus anymail's webhook view end to
end, the event map, Events API look-ups and custom-variable attribution."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from anymail.exceptions import AnymailInsecureWebhookWarning, AnymailRecipientsRefused
from anymail.signals import AnymailTrackingEvent, EventType, tracking
from django.test import RequestFactory
from django.utils import timezone

from messaging.models import Message, MessageEvent, Receipt
from messaging.receipts import receipts_apply_batch
from providers.conf import provider_config
from providers.mailgun import MailgunProvider
from providers.registry import get_provider
from providers.types import PermanentProviderError, TransientProviderError
from tests.providers.contract import ProviderContract, send_request
from tests.providers.test_sandbox_mailgun import JsonReceiver, wait_for

TRACKING_URL = "/webhooks/anymail/mailgun/tracking/"


@pytest.fixture(scope="module")
def module_receiver() -> Iterator[JsonReceiver]:
    receiver = JsonReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(autouse=True)
def receiver(module_receiver: JsonReceiver, sandbox) -> Iterator[JsonReceiver]:
    """Where the sandbox posts Mailgun webhooks in these tests (never a web process on :8000)."""
    requests.post(f"{sandbox.url}/_sandbox/config", json={"public_url": module_receiver.base}, timeout=5)
    with module_receiver.lock:
        module_receiver.calls.clear()
    yield module_receiver
    requests.post(f"{sandbox.url}/_sandbox/config", json={"public_url": None}, timeout=5)


def mailgun_body(*, event: str = "delivered", message_id: str | None = None, key: str | None = None, **data: Any):
    """A tracking webhook body in Mailgun's current format, signed with `key` (the configured one by default)."""
    key = key or provider_config("mailgun")["WEBHOOK_SIGNING_KEY"]
    timestamp, token = str(int(time.time())), uuid.uuid4().hex + uuid.uuid4().hex[:18]
    signature = hmac.new(key.encode(), f"{timestamp}{token}".encode(), hashlib.sha256).hexdigest()
    event_data = {
        "id": data.pop("id", uuid.uuid4().hex[:22]),
        "event": event,
        "timestamp": time.time(),
        "recipient": "ada@example.com",
        "message": {"headers": {"message-id": data.pop("provider_message_id", "20240101.ABC@mg.example.com")}},
        "user-variables": {"conductor_message_id": message_id} if message_id else {},
        **data,
    }
    return {"signature": {"timestamp": timestamp, "token": token, "signature": signature}, "event-data": event_data}


class TestMailgunContract(ProviderContract):
    invalid_recipient = "someone@localhost"  # anymail lets it through; Mailgun (the sandbox) answers 400

    @pytest.fixture
    def provider(self, sandbox):
        # A short timeout keeps the ambiguous-timeout case quick; the registry's adapter is
        # exercised by the tests below.
        return MailgunProvider({**provider_config("mailgun"), "TIMEOUT_SECONDS": 1.0})

    @pytest.fixture
    def provider_at(self, sandbox):
        return lambda base_url: MailgunProvider({**provider_config("mailgun"), "BASE_URL": base_url})

    @pytest.fixture
    def recipient(self):
        return "ada@example.com"

    @pytest.fixture
    def signed_webhook(self):
        def build(valid: bool):
            body = mailgun_body(message_id=str(uuid.uuid4()), key=None if valid else "not-the-signing-key")
            return RequestFactory().post(TRACKING_URL, data=json.dumps(body), content_type="application/json")

        return build


# --- sending --------------------------------------------------------------------------------------
def test_custom_variables_carry_our_id_and_token_and_the_connection_is_reused(sandbox):
    provider = get_provider("mailgun")
    session = provider.connection.session
    requests_ = [send_request("ada@example.com", body=f"hello {n}") for n in range(2)]
    results = [provider.send(request) for request in requests_]
    assert provider.connection.session is session  # one anymail session: keep-alive across sends
    for request, result in zip(requests_, results, strict=True):
        [logged] = sandbox.requests(message_id=request.message_id)
        assert (logged["token"], logged["to"], logged["body"]) == (request.token, "ada@example.com", request.body)
        assert logged["provider_message_id"] == result.provider_message_id
        assert result.provider_status == "queued"


def test_an_address_anymail_cannot_parse_is_permanent_and_never_sent(sandbox):
    with pytest.raises(PermanentProviderError) as caught:
        get_provider("mailgun").send(send_request("not-an-address"))
    assert caught.value.error_type == "invalid_recipient"
    assert sandbox.requests(provider="mailgun") == []


def test_bad_credentials_are_transient_provider_auth(sandbox):
    provider = MailgunProvider({**provider_config("mailgun"), "API_KEY": "wrong"})
    with pytest.raises(TransientProviderError) as caught:
        provider.send(send_request("ada@example.com"))
    assert (caught.value.error_type, caught.value.code) == ("provider_auth", "401")


def test_another_4xx_is_a_permanent_rejection(sandbox):
    provider = MailgunProvider({**provider_config("mailgun"), "DOMAIN": "not-ours.example"})
    with pytest.raises(PermanentProviderError) as caught:
        provider.send(send_request("ada@example.com"))
    assert (caught.value.error_type, caught.value.code) == ("rejected", "404")


def test_recipients_refused_is_an_invalid_recipient():
    error = get_provider("mailgun").classify_failure(AnymailRecipientsRefused())
    assert isinstance(error, PermanentProviderError) and error.error_type == "invalid_recipient"


# --- look-ups -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("receipt_status", "state"),
    [("read", "read"), ("undelivered", "undelivered"), ("failed", "failed")],
)
def test_fetch_status_reports_the_most_telling_event(sandbox, receipt_status, state):
    sandbox.faults("mailgun", receipt_delay_ms=0, receipt_status=receipt_status)
    provider = get_provider("mailgun")
    result = provider.send(send_request("ada@example.com"))
    status = wait_for(lambda: (s := provider.fetch_status(result.provider_message_id)).state == state and s)
    assert status and status.state == state


def test_fetch_status_of_a_dropped_message_stays_dispatched(sandbox):
    sandbox.faults("mailgun", drop_rate=1.0, receipt_delay_ms=0)
    provider = get_provider("mailgun")
    result = provider.send(send_request("ada@example.com"))
    status = provider.fetch_status(result.provider_message_id)
    assert (status.provider_status, status.state) == ("queued", "dispatched")


def test_fetch_status_of_an_unknown_message_says_nothing(sandbox):
    status = get_provider("mailgun").fetch_status("<nothing@mg.example.com>")
    assert (status.provider_status, status.state) == ("unknown", None)


def test_find_send_returns_every_acceptance_of_the_token_and_nothing_else(sandbox):
    provider = get_provider("mailgun")
    request = send_request("ada@example.com")
    since = timezone.now()
    first, second = provider.send(request), provider.send(request)  # Mailgun accepts a repeat
    provider.send(send_request("ada@example.com"))  # same recipient, another token
    found = provider.find_send(type(request)(**{**request.__dict__, "attempted_since": since}))
    assert {f.provider_message_id for f in found} == {first.provider_message_id, second.provider_message_id}


# --- the event map --------------------------------------------------------------------------------
def test_the_event_map_covers_anymails_tracking_event_types():
    tracking_types = {
        value for name, value in vars(EventType).items() if name.isupper() and not value.startswith("inbound")
    }
    assert tracking_types == set(MailgunProvider.status_map)
    expected = {
        "queued": "dispatched",
        "sent": "dispatched",
        "delivered": "delivered",
        "opened": "read",
        "clicked": "read",
        "bounced": "undelivered",
        "rejected": "failed",
        "failed": "failed",
    }
    assert {k: v for k, v in MailgunProvider.status_map.items() if v} == expected


@pytest.mark.parametrize(
    ("mailgun_event", "extra", "provider_status", "state"),
    [
        ("delivered", {}, "delivered", "delivered"),
        ("opened", {}, "opened", "read"),
        ("clicked", {"url": "https://example.com"}, "clicked", "read"),
        ("failed", {"severity": "permanent", "reason": "bounce"}, "bounced", "undelivered"),
        ("failed", {"severity": "temporary", "reason": "generic"}, "deferred", None),
        ("rejected", {"reject": {"reason": "suppressed"}}, "rejected", "failed"),
        ("complained", {}, "complained", None),
    ],
)
def test_mailgun_events_map_through_anymail(mailgun_event, extra, provider_status, state):
    ours = str(uuid.uuid4())
    body = mailgun_body(event=mailgun_event, message_id=ours, id="evt-1", **extra)
    request = RequestFactory().post(TRACKING_URL, data=json.dumps(body), content_type="application/json")
    [event] = get_provider("mailgun").parse_webhook(request)
    assert (event.provider_status, event.state) == (provider_status, state)
    assert event.event_id == "evt-1" and event.message_id == ours
    assert event.payload == {"event-data": body["event-data"]}  # the signature is never kept
    assert event.provider_message_id == "<20240101.ABC@mg.example.com>"


# --- anymail's webhook view, end to end -----------------------------------------------------------
@pytest.fixture
def sent_email(sandbox, make_message, receiver):
    """An email Message row sent through the adapter, and the sandbox's real `delivered` webhook for it."""
    from messaging.lookup import send_request
    from messaging.routing import Hop

    sandbox.faults("mailgun", receipt_delay_ms=0)
    message = make_message(channel="email", to="ada@example.com", subject="Welcome", body="Hello Ada")
    result = get_provider("mailgun").send(send_request(message, Hop("email", message.to, "mailgun")))
    Message.objects.filter(pk=message.pk).update(
        state="dispatched", provider="mailgun", provider_message_id=result.provider_message_id
    )
    # Mailgun posts `accepted` first (Conductor's own send already says as much), then `delivered`.
    [call] = wait_for(lambda: [c for c in receiver.events_for(str(message.pk)) if event_of(c) == "delivered"])
    return message, call["body"]


def event_of(call: dict[str, Any]) -> str:
    return call["body"]["event-data"]["event"]


def test_a_signed_sandbox_webhook_moves_the_message(client, sent_email):
    message, body = sent_email
    with warnings.catch_warnings():
        # Mailgun's view relies on the signature, so anymail must not warn about missing basic auth.
        warnings.simplefilter("error", AnymailInsecureWebhookWarning)
        response = client.post(TRACKING_URL, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 200
    assert receipts_apply_batch().applied == 1  # stored by the webhook, applied off the request path
    message.refresh_from_db()
    assert message.state == "delivered"
    [receipt] = Receipt.objects.filter(message=message)
    assert (receipt.provider, receipt.provider_status, receipt.mapped_state) == ("mailgun", "delivered", "delivered")
    assert receipt.event_id == body["event-data"]["id"] and receipt.applied
    assert receipt.payload == {"event-data": body["event-data"]}  # the signature is never kept


def test_a_badly_signed_webhook_is_refused_and_changes_nothing(client, sent_email):
    message, body = sent_email
    body["signature"]["signature"] = "0" * 64
    response = client.post(TRACKING_URL, data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    unsigned = {"event-data": body["event-data"]}
    assert client.post(TRACKING_URL, data=json.dumps(unsigned), content_type="application/json").status_code == 400
    message.refresh_from_db()
    assert message.state == "dispatched" and not Receipt.objects.exists()


def test_the_same_event_posted_ten_times_is_one_receipt_and_one_change(client, sent_email):
    # The same signature again is a replay (403); Mailgun signs each delivery afresh.
    message, body = sent_email
    codes = [
        client.post(TRACKING_URL, data=json.dumps(body), content_type="application/json").status_code for _ in range(10)
    ]
    assert codes == [200] + [403] * 9
    receipts_apply_batch()
    assert Receipt.objects.filter(message=message).count() == 1
    assert MessageEvent.objects.filter(message=message, to_state="delivered").count() == 1
    message.refresh_from_db()
    assert message.state == "delivered"


def test_a_receipt_for_the_same_event_resigned_is_still_one_receipt(client, sent_email):
    # Mailgun signs each delivery of a webhook afresh; the event id, not the token, identifies it.
    message, body = sent_email
    resigned = mailgun_body(**{"id": body["event-data"]["id"]})
    resigned["event-data"] = body["event-data"]
    for payload in (body, resigned):
        assert client.post(TRACKING_URL, data=json.dumps(payload), content_type="application/json").status_code == 200
    receipts_apply_batch()
    assert Receipt.objects.filter(message=message).count() == 1


def test_the_generic_provider_webhook_also_takes_mailgun(client, sent_email):
    message, body = sent_email
    forged = json.loads(json.dumps(body))
    forged["signature"]["token"] = "x" * 50
    assert (
        client.post("/webhooks/mailgun/", data=json.dumps(forged), content_type="application/json").status_code == 403
    )
    assert client.post("/webhooks/mailgun/", data=json.dumps(body), content_type="application/json").status_code == 204
    receipts_apply_batch()
    message.refresh_from_db()
    assert message.state == "delivered"


def test_tracking_events_of_other_esps_are_left_alone(db):
    event = AnymailTrackingEvent(event_type="delivered", event_id="e-1", message_id="<x>", esp_event={})
    tracking.send(sender=object, event=event, esp_name="SendGrid")
    assert not Receipt.objects.exists()
