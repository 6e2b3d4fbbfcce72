"""Email and the suppression list on the running stack (issue 22): a hard bounce and a complaint
through the sandbox's real Mailgun tracking webhooks (posted to the receipt intake, applied by a
worker) suppress the address, a soft bounce does not; a bulk email's List-Unsubscribe link
reaches Mailgun and works from a real HTTP POST to the web (GET does not unsubscribe), a forged
link is refused, and a transactional email carries no such link."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
import requests

from messaging.models import Message, Receipt, Suppression
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import wait_for_all
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def acme(live):
    key = api_key_create(client_name="acme")
    return key[0].client, key[1]


@pytest.fixture
def send(live, acme):
    def send_one(**fields) -> Message:
        body = {"channel": "email", "subject": "Hello", "body": "Hello there", **fields}
        response = live.api(acme[1]).post(f"{live.web_url}/api/v1/messages/", json=body, timeout=10)
        assert response.status_code == 201, response.text
        return Message.objects.get(pk=response.json()["id"])

    return send_one


def suppressions(address: str) -> list[Suppression]:
    return list(Suppression.objects.filter(address=address, lifted_at__isnull=True))


def test_a_hard_bounce_and_a_complaint_suppress_a_soft_bounce_does_not(live, send, acme):
    live.sandbox_faults(
        "mailgun",
        receipt_delay_ms=0,
        recipient_outcomes={
            "gone@example.com": "hard_bounce",
            "angry@example.com": "complained",
            "busy@example.com": "soft_bounce",
        },
    )
    gone = send(to="gone@example.com")
    angry = send(to="angry@example.com", priority="bulk", category="marketing")
    busy = send(to="busy@example.com")
    wait_until(lambda: suppressions("gone@example.com") and suppressions("angry@example.com"), 30, what="suppressions")
    wait_for_all([busy.pk, angry.pk], {"delivered"}, timeout=30)
    wait_until(
        lambda: Receipt.objects.filter(message=busy, provider_status="deferred", processed_at__isnull=False).exists(),
        30,
        what="the soft bounce applied",
    )
    [bounce] = suppressions("gone@example.com")
    [complaint] = suppressions("angry@example.com")
    assert (bounce.client, bounce.reason, bounce.scope, bounce.covers_exempt) == (acme[0], "hard_bounce", "", True)
    assert (complaint.client, complaint.reason, complaint.scope) == (acme[0], "complaint", "")
    assert suppressions("busy@example.com") == []
    gone.refresh_from_db()
    assert gone.state == "undelivered"


def unsubscribe_link(live, message: Message) -> str:
    wait_until(lambda: live.sandbox_requests(message_id=str(message.pk), accepted="true"), 30, what="the send")
    [logged] = live.sandbox_requests(message_id=str(message.pk), accepted="true")
    assert logged["headers"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    return logged["headers"]["List-Unsubscribe"].strip("<>")


def test_one_click_unsubscribe_over_real_http(live, send, acme):
    message = send(to="Ada@Example.com", priority="bulk", category="marketing")
    url = unsubscribe_link(live, message)
    assert url.startswith(f"{live.web_url}/unsubscribe/")
    page = requests.get(url, timeout=10)  # a link scanner's or a person's visit
    assert page.status_code == 200 and 'method="post"' in page.text
    assert suppressions("ada@example.com") == []

    # A forged link (another address, the signature kept) and an altered one: refused, nothing stored.
    token = urlsplit(url).path.split("/")[2]
    payload, _, signature = token.rpartition(":")
    for forged in (
        f"{payload[:-1]}{'A' if payload[-1] != 'A' else 'B'}:{signature}",
        f"{payload}:{'0' * len(signature)}",
    ):
        response = requests.post(
            f"{live.web_url}/unsubscribe/{forged}/", data={"List-Unsubscribe": "One-Click"}, timeout=10
        )
        assert response.status_code == 400
    assert suppressions("ada@example.com") == []

    for _ in range(2):  # the mailbox provider's one-click POST (RFC 8058), then a repeat
        response = requests.post(url, data={"List-Unsubscribe": "One-Click"}, timeout=10)
        assert response.status_code == 200 and "unsubscribed" in response.text
    [suppression] = suppressions("ada@example.com")
    assert (suppression.client, suppression.reason, suppression.scope) == (acme[0], "unsubscribed", "marketing")
    assert suppression.source == "one-click"


def test_a_transactional_email_carries_no_unsubscribe_link(live, send):
    message = send(to="ada@example.com", priority="transactional", category="password_reset")
    wait_until(lambda: live.sandbox_requests(message_id=str(message.pk), accepted="true"), 30, what="the send")
    [logged] = live.sandbox_requests(message_id=str(message.pk), accepted="true")
    assert "List-Unsubscribe" not in logged["headers"] and "List-Unsubscribe-Post" not in logged["headers"]
