"""A recipient texts STOP, START, HELP to our number, emulated by the sandbox as the provider would
post it, to the real web process (gunicorn): the client that last sent to the number gets the
suppression, another client does not; START lifts it; HELP is answered; the provider's retries,
however concurrent, do nothing twice; a forged one changes nothing."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from messaging.models import InboundMessage, Message, Suppression
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import wait_for_all
from tests.support.processes import wait_until
from tests.support.signed_inbound import TWILIO_INBOUND_PATH, twilio_inbound

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

NUMBER = "+14155552671"


@pytest.fixture
def clients(live):
    """Two clients' API keys by name, and a function that sends an SMS as one of them until delivered."""
    keys = {name: api_key_create(client_name=name)[1] for name in ("acme", "globex")}

    def send(name: str, body: str = "Your code is 123456", **fields) -> requests.Response:
        payload = {"channel": "sms", "to": NUMBER, "body": body, **fields}
        return live.api(keys[name]).post(f"{live.web_url}/api/v1/messages/", json=payload, timeout=10)

    return send


def sandbox_inbound(live, provider: str, body: str, **fields) -> dict:
    response = requests.post(
        f"{live.sandbox_url}/_sandbox/inbound",
        json={"provider": provider, "from": NUMBER, "body": body, **fields},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def delivered(response: requests.Response) -> Message:
    assert response.status_code == 201, response.text
    wait_for_all([response.json()["id"]], {"delivered"}, timeout=30)
    return Message.objects.get(pk=response.json()["id"])


def test_stop_suppresses_for_the_client_that_sent_last_and_start_lifts(live, clients):
    delivered(clients("acme"))
    globex_message = delivered(clients("globex"))  # the latest to the number: the STOP answers globex
    answer = sandbox_inbound(live, "twilio", "Stop")
    assert answer["status"] == 200 and answer["content_type"].startswith("text/xml")
    assert answer["url"] == f"{live.web_url}/webhooks/twilio/inbound/"  # CONDUCTOR_PUBLIC_URL's
    suppression = Suppression.objects.get(lifted_at__isnull=True)
    assert (suppression.client_id, suppression.channel, suppression.address) == (
        globex_message.client_id,
        "sms",
        NUMBER,
    )
    assert (suppression.reason, suppression.scope, suppression.source) == ("stop_keyword", "", "twilio inbound")
    # The acceptance check (another part of issue 22) turns globex's next message to the number
    # into `failed`/`suppressed`: test_a_client_s_next_message_after_stop_is_suppressed below.

    assert sandbox_inbound(live, "vonage", "START")["status"] == 204
    assert not Suppression.objects.filter(lifted_at__isnull=True).exists()
    assert list(InboundMessage.objects.order_by("received_at").values_list("provider", "keyword", "action")) == [
        ("twilio", "STOP", "suppressed"),
        ("vonage", "START", "lifted"),
    ]


def test_a_client_s_next_message_after_stop_is_suppressed(live, clients):
    delivered(clients("acme"))
    assert sandbox_inbound(live, "twilio", "STOP")["status"] == 200
    # Twilio's own list is per sender number: with one number per client, globex's sender never
    # got the STOP (here they share the sandbox's, so its list is cleared for globex's turn).
    live.sandbox_faults("twilio", opted_out=[])
    response = clients("acme", body="Another one")
    assert response.status_code == 201, response.text
    assert response.json()["state"] == "failed" and response.json()["last_error"]["type"] == "suppressed"
    assert delivered(clients("globex")).client.name == "globex"  # another client's message still goes


def test_help_through_vonage_is_answered_by_a_message_conductor_sends(live, clients):
    delivered(clients("acme"))
    answer = sandbox_inbound(live, "vonage", "help")
    assert answer["status"] == 204
    wait_until(lambda: Message.objects.filter(category="help_reply").exists(), 10, what="the HELP reply")
    reply = Message.objects.get(category="help_reply")
    assert reply.priority == "critical" and reply.to == NUMBER and reply.client.name == "acme"
    wait_for_all([reply.pk], {"delivered"}, timeout=30)
    [sent] = live.sandbox_requests(message_id=str(reply.pk), accepted="true")
    assert sent["body"] == reply.body and "STOP" in reply.body


def test_help_through_twilio_is_answered_in_twiml(live, clients):
    answer = sandbox_inbound(live, "twilio", "INFO")
    assert answer["status"] == 200
    assert "<Response><Message>" in answer["body"] and "STOP" in answer["body"]
    assert not Message.objects.exists()  # nothing else sent


def test_the_same_stop_posted_many_times_at_once_does_its_work_once(live, clients):
    delivered(clients("acme"))
    params, headers = twilio_inbound("STOP", url=live.web_url + TWILIO_INBOUND_PATH)
    headers = {"X-Twilio-Signature": headers["HTTP_X_TWILIO_SIGNATURE"]}

    def post(_: int) -> int:
        return requests.post(live.web_url + TWILIO_INBOUND_PATH, data=params, headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(post, range(8)))
    assert codes == [200] * 8
    assert Suppression.objects.count() == 1 and InboundMessage.objects.count() == 1


def test_a_forged_stop_is_refused_and_changes_nothing(live, clients):
    delivered(clients("acme"))
    params, headers = twilio_inbound("STOP", url=live.web_url + TWILIO_INBOUND_PATH, auth_token="forged")
    response = requests.post(
        live.web_url + TWILIO_INBOUND_PATH,
        data=params,
        headers={"X-Twilio-Signature": headers["HTTP_X_TWILIO_SIGNATURE"]},
        timeout=10,
    )
    assert response.status_code == 403
    response = requests.post(live.web_url + TWILIO_INBOUND_PATH, data=b"\xff\x00", timeout=10)
    assert response.status_code in (400, 403)
    assert not Suppression.objects.exists() and not InboundMessage.objects.exists()
