"""Mailgun's tracking webhooks, at anymail's URL and at ours: a stale or reused signature is refused
(403), an event we cannot make a receipt of is 400, Redis down is 503; none of them stores anything,
and what is stored keeps no signature."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass

import pytest
from django.test import Client

from messaging.models import Message, Receipt
from messaging.receipts import receipts_apply_batch
from providers.redis_state import reset_shared_redis
from providers.registry import reset_provider_cache
from tests.support.signed_receipts import (
    MAILGUN_PROVIDER_PATH,
    MAILGUN_TRACKING_PATH,
    mailgun_body,
    mailgun_event,
    mailgun_legacy_form,
)

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Door:
    """One of the two URLs Mailgun's webhooks are taken at, and what each answers."""

    path: str
    ok: int
    bad_signature: int

    def post(self, client: Client, body) -> int:
        return client.post(self.path, data=json.dumps(body), content_type="application/json").status_code


ANYMAIL = Door(MAILGUN_TRACKING_PATH, ok=200, bad_signature=400)  # anymail's own answer to a bad signature
OURS = Door(MAILGUN_PROVIDER_PATH, ok=204, bad_signature=403)


@pytest.fixture(params=[ANYMAIL, OURS], ids=["anymail", "provider"])
def door(request) -> Door:
    return request.param


@pytest.fixture
def client() -> Client:
    return Client(raise_request_exception=False)  # a 500 is an answer to assert on, not a test error


@pytest.fixture
def email(make_message) -> Message:
    return make_message(
        channel="email",
        to="ada@example.com",
        state="dispatched",
        provider="mailgun",
        provider_message_id="<20240101.42@mg.example.com>",
    )


def delivered(email: Message, /, **data) -> dict:
    """The event of `email` (our id in its variables, Mailgun's in its headers), with `data` over it."""
    headers = {"message-id": email.provider_message_id.strip("<>")}
    return mailgun_event(message_id=str(email.pk), **{"message": {"headers": headers}, **data})


def test_a_signed_webhook_is_taken_and_its_signature_not_kept(client, door, email):
    body = mailgun_body(delivered(email))
    assert door.post(client, body) == door.ok
    receipts_apply_batch()
    email.refresh_from_db()
    [receipt] = Receipt.objects.all()
    assert email.state == "delivered" and receipt.applied
    assert receipt.payload == {"event-data": body["event-data"]}


def test_the_legacy_form_keeps_no_signature_or_token_either(client, email):
    form = mailgun_legacy_form(message_id=str(email.pk))
    assert client.post(MAILGUN_TRACKING_PATH, data=form).status_code == 200
    [receipt] = Receipt.objects.all()
    assert "signature" not in receipt.payload and "token" not in receipt.payload
    assert receipt.payload["event"] == "delivered"
    assert client.post(MAILGUN_TRACKING_PATH, data=form).status_code == 403  # its token, again


@pytest.mark.parametrize("second", [ANYMAIL, OURS], ids=["then-anymail", "then-provider"])
def test_a_token_is_taken_once_whichever_door_it_comes_through(client, door, second, email):
    body = mailgun_body(delivered(email))
    assert door.post(client, body) == door.ok
    # The signature does not cover the body: a replay may carry any event.
    replay = {**body, "event-data": delivered(email, event="failed", severity="permanent")}
    assert second.post(client, replay) == 403
    assert second.post(client, body) == 403
    assert Receipt.objects.count() == 1
    receipts_apply_batch()
    assert Message.objects.get(pk=email.pk).state == "delivered"


@pytest.mark.parametrize(("age", "words"), [(301, "stale"), (-301, "ahead")])
def test_a_signature_outside_five_minutes_is_refused(client, door, email, age, words):
    body = mailgun_body(delivered(email), timestamp=str(int(time.time() - age)))
    assert door.post(client, body) == 403, words
    assert not Receipt.objects.exists()
    assert Message.objects.get(pk=email.pk).state == "dispatched"


def test_the_window_is_a_setting(client, door, email, settings):
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["mailgun"]["WEBHOOK_MAX_AGE_SECONDS"] = 3600.0
    settings.CONDUCTOR_PROVIDERS = providers
    reset_provider_cache()
    try:
        body = mailgun_body(delivered(email), timestamp=str(int(time.time() - 1800)))
        assert door.post(client, body) == door.ok
    finally:
        reset_provider_cache()


def test_a_bad_signature_spends_no_token(client, door, email):
    body = mailgun_body(delivered(email))
    forged = {**body, "signature": {**body["signature"], "signature": "0" * 64}}
    assert door.post(client, forged) == door.bad_signature
    assert door.post(client, body) == door.ok


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_with_redis_down_it_is_503_so_that_mailgun_retries(client, door, email, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    reset_shared_redis()
    body = mailgun_body(delivered(email))
    assert door.post(client, body) == 503
    assert not Receipt.objects.exists()


def test_a_webhook_that_failed_after_its_check_can_be_retried(client, email, monkeypatch):
    # anymail's URL: the receiver that stores the receipt fails (database down): 500, and the
    # token is released so that Mailgun's retry of the same delivery is taken, not refused.
    import messaging.receipts

    def down(**kwargs):
        raise RuntimeError("database down")

    body = mailgun_body(delivered(email))
    with monkeypatch.context() as patch:
        patch.setattr(messaging.receipts, "receipts_store", down)
        assert ANYMAIL.post(client, body) == 500
    assert ANYMAIL.post(client, body) == 200
    assert Receipt.objects.count() == 1


LONG = "x" * 300


@pytest.mark.parametrize(
    ("event_data", "field"),
    [
        (lambda m: delivered(m, **{"user-variables": ["conductor_message_id", "x"]}), "custom variables"),
        (lambda m: delivered(m, **{"user-variables": "conductor_message_id"}), "custom variables"),
        (lambda m: delivered(m, **{"user-variables": {"conductor_message_id": "not-a-uuid"}}), "message_id"),
        (lambda m: delivered(m, **{"user-variables": {"conductor_message_id": 42}}), "message_id"),
        (lambda m: delivered(m, **{"user-variables": {"conductor_message_id": [str(m.pk)]}}), "message_id"),
        (lambda m: delivered(m, message={"headers": {"message-id": ["a@b"]}}), ""),
        (lambda m: delivered(m, message={"headers": {"message-id": 42}}), ""),
        (lambda m: delivered(m, message={"headers": {"message-id": LONG}}), "provider_message_id"),
        (lambda m: delivered(m, message=["headers"]), ""),
        (lambda m: delivered(m, id=LONG), "event_id"),
        (lambda m: delivered(m, id=["e1"]), "event id"),
        (lambda m: delivered(m, id=7), "event id"),
        (lambda m: delivered(m, event=["delivered"]), ""),
        (lambda m: {k: v for k, v in delivered(m).items() if k != "event"}, "event"),
        (lambda m: delivered(m, timestamp="yesterday"), ""),
        (lambda m: delivered(m, timestamp=1e300), ""),
        (lambda m: delivered(m, severity=["permanent"], event="failed"), ""),
        (lambda m: delivered(m, event="rejected", reject="suppressed"), ""),
        (lambda m: delivered(m, **{"client-info": "Firefox"}), ""),
        (lambda m: ["event-data"], ""),
        (lambda m: "delivered", ""),
    ],
)
def test_an_event_we_cannot_make_a_receipt_of_is_400(client, door, email, event_data, field):
    response = client.post(door.path, data=json.dumps(mailgun_body(event_data(email))), content_type="application/json")
    assert response.status_code == 400, response.content
    assert field in response.json()["detail"]
    assert not Receipt.objects.exists()


def test_a_refused_event_spends_no_token(client, door, email):
    body = mailgun_body(delivered(email, **{"user-variables": "oops"}))
    assert door.post(client, body) == 400
    body["event-data"] = delivered(email)
    assert door.post(client, body) == door.ok  # Mailgun's retry (same delivery) is taken


@pytest.mark.parametrize(
    "body",
    [
        {"signature": ["timestamp", "token"], "event-data": {}},
        {"signature": {"timestamp": "1", "token": "é" * 50, "signature": "0" * 64}, "event-data": {}},
        {"signature": {"timestamp": None, "token": None, "signature": None}, "event-data": {}},
        {"event-data": {}},
    ],
    ids=["signature-list", "non-ascii-token", "nulls", "unsigned"],
)
def test_a_malformed_signature_is_a_bad_signature_not_a_500(client, door, body):
    assert door.post(client, body) == door.bad_signature


@pytest.mark.parametrize("data", [b"{not json", b"\xff\xfe\x00", b"[]", b'"signature"', b"null"])
def test_a_json_body_that_is_not_a_json_object_is_400(client, door, data):
    response = client.post(door.path, data=data, content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.json()["detail"]


def test_a_body_that_is_neither_json_nor_a_form_has_no_signature(client, door):
    response = client.post(door.path, data=b"event=delivered", content_type="text/plain")
    assert response.status_code == door.bad_signature
