"""Email feeds the suppression list (issue 22): the sandbox's real Mailgun tracking webhooks (a
hard bounce, a complaint, an unsubscribe; a soft bounce does not), taken at our tracking URL and
applied; List-Unsubscribe headers on bulk and list emails; the one-click endpoint and its token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from django.core import signing
from django.test import Client

from messaging.lookup import send_request
from messaging.models import Message, Receipt, Suppression
from messaging.receipts import receipts_apply_batch
from messaging.routing import Hop
from messaging.suppressions.unsubscribe import (
    InvalidUnsubscribeToken,
    UnsubscribeTarget,
    list_unsubscribe_headers,
    unsubscribe_target,
    unsubscribe_token,
)
from providers.registry import get_provider
from tests.providers.test_sandbox_mailgun import JsonReceiver, wait_for
from tests.support.signed_receipts import MAILGUN_PROVIDER_PATH, MAILGUN_TRACKING_PATH, mailgun_signature

pytestmark = pytest.mark.django_db

ADA = "ada@example.com"


@pytest.fixture(scope="module")
def module_receiver() -> Iterator[JsonReceiver]:
    receiver = JsonReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def receiver(module_receiver: JsonReceiver, sandbox) -> Iterator[JsonReceiver]:
    """Where the sandbox posts its Mailgun webhooks here: captured, then posted to our view by the test."""
    requests.post(f"{sandbox.url}/_sandbox/config", json={"public_url": module_receiver.base}, timeout=5)
    with module_receiver.lock:
        module_receiver.calls.clear()
    yield module_receiver
    requests.post(f"{sandbox.url}/_sandbox/config", json={"public_url": None}, timeout=5)


@pytest.fixture
def web() -> Client:
    return Client(raise_request_exception=False)  # a 500 is an answer to assert on


@pytest.fixture
def send_email(sandbox, make_message, receiver):
    """Send an email Message through the Mailgun adapter (the sandbox) and record it dispatched,
    as dispatch does; returns it and a waiter for the sandbox's webhook of one Mailgun event."""
    sandbox.faults("mailgun", receipt_delay_ms=0)

    def send(to: str = ADA, outcome: str | None = None, **fields: Any) -> tuple[Message, Any]:
        if outcome:
            sandbox.faults("mailgun", recipient_outcomes={to.lower(): outcome})
        values = {"channel": "email", "to": to, "subject": "News", "body": "Hello", "priority": "transactional"}
        message = make_message(**{**values, **fields})
        result = get_provider("mailgun").send(send_request(message, Hop("email", message.to, "mailgun")))
        Message.objects.filter(pk=message.pk).update(
            state="dispatched", provider="mailgun", provider_message_id=result.provider_message_id
        )

        def webhook(event: str) -> dict[str, Any]:
            [call] = wait_for(
                lambda: [c for c in receiver.events_for(str(message.pk)) if c["body"]["event-data"]["event"] == event]
            )
            return call["body"]

        return message, webhook

    return send


def post(web: Client, body: dict[str, Any], path: str = MAILGUN_TRACKING_PATH) -> int:
    return web.post(path, data=json.dumps(body), content_type="application/json").status_code


def resigned(body: dict[str, Any]) -> dict[str, Any]:
    """Mailgun's retry of a webhook: the same event, signed afresh (a new timestamp and token)."""
    return {**body, "signature": mailgun_signature()}


def active(client=None) -> list[Suppression]:
    rows = Suppression.objects.filter(lifted_at__isnull=True)
    return list(rows.filter(client=client) if client is not None else rows)


# --- tracking events ----------------------------------------------------------------------------
def test_a_hard_bounce_suppresses_once_however_often_the_webhook_is_retried(web, send_email, client_key):
    message, webhook = send_email("Gone@Example.com", outcome="hard_bounce")
    body = webhook("failed")
    assert body["event-data"]["severity"] == "permanent"
    assert post(web, body) == 200
    assert post(web, resigned(body)) == 200  # Mailgun retries (say our answer was lost)
    assert post(web, resigned(body), path=MAILGUN_PROVIDER_PATH) == 204  # and the other door
    receipts_apply_batch()
    receipts_apply_batch()
    [suppression] = active()
    assert (suppression.client, suppression.channel, suppression.address) == (
        client_key[0],
        "email",
        "gone@example.com",
    )
    assert (suppression.reason, suppression.scope, suppression.covers_exempt) == ("hard_bounce", "", True)
    assert suppression.source == "mailgun bounced" and str(message.pk) in suppression.note
    message.refresh_from_db()
    assert message.state == "undelivered"  # the receipt still does what it did
    assert Receipt.objects.filter(message=message).count() == 1


def test_a_permanent_failure_not_about_the_address_suppresses_nothing(web, send_email):
    """anymail's `bounced` with a reject reason other than a bounce (Mailgun's `generic`: its
    policy, a relay's refusal of the content) says nothing of the mailbox."""
    message, webhook = send_email(outcome="hard_bounce")
    body = webhook("failed")
    body["event-data"]["reason"] = "generic"
    assert post(web, resigned(body)) == 200
    receipts_apply_batch()
    assert active() == []
    [receipt] = Receipt.objects.filter(message=message)
    assert (receipt.provider_status, receipt.error_code, receipt.applied) == ("bounced", "other", True)


def test_a_complaint_suppresses_every_non_exempt_category(web, send_email):
    message, webhook = send_email(outcome="complained", category="marketing", priority="bulk")
    assert post(web, webhook("delivered")) == 200
    body = webhook("complained")
    assert post(web, body) == 200
    receipts_apply_batch()
    assert post(web, resigned(body)) == 200
    receipts_apply_batch()
    [suppression] = active()
    assert (suppression.address, suppression.reason, suppression.scope) == (ADA, "complaint", "")
    assert not suppression.covers_exempt
    message.refresh_from_db()
    assert message.state == "delivered"  # a complaint says nothing about delivery


def test_a_soft_bounce_suppresses_nothing(web, send_email):
    message, webhook = send_email(outcome="soft_bounce")
    body = webhook("failed")
    assert body["event-data"]["severity"] == "temporary"
    assert post(web, body) == 200
    assert post(web, webhook("delivered")) == 200
    receipts_apply_batch()
    assert active() == []
    statuses = set(Receipt.objects.filter(message=message).values_list("provider_status", flat=True))
    assert statuses == {"deferred", "delivered"}
    message.refresh_from_db()
    assert message.state == "delivered"


def test_an_unsubscribe_from_a_list_email_covers_that_list(web, send_email):
    _, webhook = send_email(outcome="unsubscribed", category="newsletter")
    assert post(web, webhook("unsubscribed")) == 200
    receipts_apply_batch()
    [suppression] = active()
    assert (suppression.reason, suppression.scope, suppression.source) == (
        "unsubscribed",
        "newsletter",
        "mailgun unsubscribed",
    )


def test_an_unsubscribe_from_another_email_covers_every_non_exempt_category(web, send_email):
    _, webhook = send_email(outcome="unsubscribed", category="receipts")
    assert post(web, webhook("unsubscribed")) == 200
    receipts_apply_batch()
    [suppression] = active()
    assert (suppression.reason, suppression.scope) == ("unsubscribed", "")


def test_a_signed_event_about_a_message_not_sent_there_suppresses_nothing(web, send_email, make_message):
    """Only an event matched to a message handed to that provider names a client's address."""
    _, webhook = send_email(outcome="complained")
    body = webhook("complained")
    stranger = make_message(channel="email", to="eve@example.com", state="dispatched")  # never sent to Mailgun
    body["event-data"]["user-variables"] = {"conductor_message_id": str(stranger.pk)}
    body["event-data"]["message"]["headers"]["message-id"] = "other@mg.example.com"
    body["event-data"]["id"] = "another-event-id"
    assert post(web, resigned(body)) == 200
    receipts_apply_batch()
    assert active() == []


# --- List-Unsubscribe headers ---------------------------------------------------------------------
def test_a_bulk_email_carries_the_one_click_headers_to_mailgun(sandbox, send_email, client_key):
    message, _ = send_email(priority="bulk", category="promo")
    [logged] = sandbox.requests(message_id=str(message.pk))
    headers = logged["headers"]
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    url = headers["List-Unsubscribe"].strip("<>")
    assert url.startswith("http://127.0.0.1:8000/unsubscribe/") and url.endswith("/")
    target = unsubscribe_target(urlsplit(url).path.split("/")[2])
    assert target == UnsubscribeTarget(client_key[0].pk, "email", ADA, "")


def test_a_list_category_carries_them_scoped_to_it_and_a_transactional_email_does_not(sandbox, send_email):
    listed, _ = send_email(priority="transactional", category="marketing")
    plain, _ = send_email(priority="transactional", category="password_reset")
    [listed_log] = sandbox.requests(message_id=str(listed.pk))
    [plain_log] = sandbox.requests(message_id=str(plain.pk))
    token = urlsplit(listed_log["headers"]["List-Unsubscribe"].strip("<>")).path.split("/")[2]
    assert unsubscribe_target(token).scope == "marketing"
    assert "List-Unsubscribe" not in plain_log["headers"] and "List-Unsubscribe-Post" not in plain_log["headers"]


def test_the_categories_are_a_setting(settings, client_key):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "LIST_UNSUBSCRIBE_CATEGORIES": ["digest"]}
    headers = list_unsubscribe_headers(client_id=1, address=ADA, category="digest", priority="transactional")
    assert unsubscribe_target(headers["List-Unsubscribe"].strip("<>").split("/")[-2]).scope == "digest"
    assert list_unsubscribe_headers(client_id=1, address=ADA, category="marketing", priority="critical") == {}


def test_an_sms_gets_no_headers(make_message):
    message = make_message(priority="bulk", category="marketing")
    assert send_request(message, Hop("sms", message.to, "twilio")).headers == {}


# --- the token and the endpoint -------------------------------------------------------------------
def token_for(client, scope: str = "marketing", address: str = ADA) -> str:
    return unsubscribe_token(UnsubscribeTarget(client.pk, "email", address, scope))


def tampered(token: str) -> list[str]:
    """The token with its payload or its signature changed, cut short, or not ours at all."""
    payload, _, signature = token.rpartition(":")
    other = UnsubscribeTarget(1, "email", "eve@example.com", "")
    return [
        payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1] + ":" + signature,
        payload + ":" + signature[:-1] + ("A" if signature[-1] != "A" else "B"),
        token[:-5],
        "nonsense",
        signing.dumps([other.client_id, other.channel, other.address, other.scope], salt="another.salt"),
        unsubscribe_token(UnsubscribeTarget(1, "sms", "+14155552671", "")),  # ours, but not an email link
        signing.dumps([1, "email", ADA, ""], salt="conductor.unsubscribe"),  # a timestamped signature
    ]


def test_a_forged_or_altered_token_is_refused(client_key):
    for token in tampered(token_for(client_key[0])):
        with pytest.raises(InvalidUnsubscribeToken):
            unsubscribe_target(token)


def test_post_unsubscribes_once_get_never(web, client_key):
    client = client_key[0]
    path = f"/unsubscribe/{token_for(client)}/"
    page = web.get(path)
    assert page.status_code == 200 and b'method="post"' in page.content and b"List-Unsubscribe" in page.content
    assert active() == []
    for _ in range(2):
        response = web.post(path, data="List-Unsubscribe=One-Click", content_type="application/x-www-form-urlencoded")
        assert response.status_code == 200 and b"unsubscribed" in response.content
    [suppression] = active(client)
    assert (suppression.address, suppression.scope) == (ADA, "marketing")
    assert (suppression.reason, suppression.source, suppression.covers_exempt) == ("unsubscribed", "one-click", False)


def test_a_forged_link_is_a_400_and_stores_nothing(web, client_key):
    for token in tampered(token_for(client_key[0])):
        for method in (web.get, web.post):
            response = method(f"/unsubscribe/{token}/")
            assert response.status_code == 400, token
    assert active() == []


def test_a_link_of_a_deleted_client_is_refused(web, client_key):
    token = unsubscribe_token(UnsubscribeTarget(10**9, "email", ADA, ""))
    assert web.post(f"/unsubscribe/{token}/").status_code == 400
    assert active() == []


def test_other_methods_are_refused(web, client_key):
    assert web.put(f"/unsubscribe/{token_for(client_key[0])}/").status_code == 405
    assert active() == []
