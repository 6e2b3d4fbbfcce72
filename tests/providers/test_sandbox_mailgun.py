"""The sandbox's Mailgun emulation over raw HTTP: wire format, auth, faults, Events API, signed webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from providers.sandbox.app import BackgroundSandbox, SandboxConfig, start_background
from tests.support.webhook_receiver import WebhookReceiver

API_KEY = "key-sandbox-test"
DOMAIN = "mg.test.example"
SIGNING_KEY = "signing-key-sandbox-test"
TRACKING_PATH = "/webhooks/anymail/mailgun/tracking/"

# Every wait below polls with a deadline; this only stops a hung server from hanging the suite.
pytestmark = pytest.mark.timeout(30)


class JsonReceiver(WebhookReceiver):
    """Our Mailgun tracking-webhook endpoint, as the sandbox calls it (JSON bodies)."""

    def events_for(self, message_id: str) -> list[dict[str, Any]]:
        return self.matching(
            lambda call: call["body"]["event-data"]["user-variables"].get("conductor_message_id") == message_id
        )


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    return predicate()


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundSandbox]:
    config = SandboxConfig(
        "AC" + "5" * 32,
        "twilio-token",
        seed=11,
        mailgun_api_key=API_KEY,
        mailgun_domain=DOMAIN,
        mailgun_webhook_signing_key=SIGNING_KEY,
    )
    sandbox = start_background(config)
    try:
        yield sandbox
    finally:
        sandbox.stop()


@pytest.fixture(scope="module")
def module_receiver() -> Iterator[JsonReceiver]:
    receiver = JsonReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def receiver(module_receiver: JsonReceiver, server: BackgroundSandbox) -> Iterator[JsonReceiver]:
    # Mailgun's webhook URL is per domain: set at runtime, as in Mailgun's dashboard.
    requests.post(f"{server.url}/_sandbox/config", json={"public_url": module_receiver.base}, timeout=5)
    with module_receiver.lock:
        module_receiver.calls.clear()
    yield module_receiver
    requests.post(f"{server.url}/_sandbox/config", json={"public_url": None}, timeout=5)


@pytest.fixture
def mg(server: BackgroundSandbox, receiver: JsonReceiver) -> Iterator[Mailgun]:
    requests.post(f"{server.url}/_sandbox/reset", json={}, timeout=5).raise_for_status()
    with requests.Session() as session:
        yield Mailgun(server.url, session)


class Mailgun:
    """Raw HTTP against the emulated API, with the sandbox's control API alongside."""

    def __init__(self, url: str, session: requests.Session) -> None:
        self.url, self.session = url, session
        self.api = f"{url}/v3/{DOMAIN}"

    def send(
        self, *, to: str = "ada@example.com", message_id: str = "m-1", auth: Any = ("api", API_KEY), **fields: Any
    ):
        data = {
            "from": "Conductor <no-reply@mg.test.example>",
            "to": to,
            "subject": "Hello",
            "text": f"body of {message_id}",
            "v:conductor_message_id": message_id,
            "v:conductor_token": f"{message_id}.1",
            **fields,
        }
        return self.session.post(f"{self.api}/messages", data=data, auth=auth, timeout=fields.pop("timeout", 5))

    def events(self, auth: Any = ("api", API_KEY), **params: Any) -> requests.Response:
        return self.session.get(f"{self.api}/events", params=params, auth=auth, timeout=5)

    def faults(self, **faults: Any) -> None:
        self.session.post(
            f"{self.url}/_sandbox/faults", json={"provider": "mailgun", **faults}, timeout=5
        ).raise_for_status()

    def logged(self, **filters: Any) -> list[dict[str, Any]]:
        return self.session.get(f"{self.url}/_sandbox/requests", params=filters, timeout=5).json()["requests"]


def signature_ok(body: dict[str, Any], key: str = SIGNING_KEY) -> bool:
    block = body["signature"]
    expected = hmac.new(key.encode(), f"{block['timestamp']}{block['token']}".encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, block["signature"])


# --- sending ------------------------------------------------------------------------------------
def test_a_send_is_queued_and_attributed_from_custom_variables(mg: Mailgun):
    response = mg.send(message_id="m-attr")
    assert response.status_code == 200
    payload = response.json()
    assert payload["message"] == "Queued. Thank you."
    assert payload["id"].startswith("<") and payload["id"].endswith(f"@{DOMAIN}>")
    [logged] = mg.logged(message_id="m-attr")
    assert logged == {
        **logged,
        "provider": "mailgun",
        "channel": "email",
        "token": "m-attr.1",
        "to": "ada@example.com",
        "body": "body of m-attr",
        "accepted": True,
        "status_code": 200,
        "provider_message_id": payload["id"],
    }


def test_multipart_and_the_variables_header_are_understood(mg: Mailgun):
    fields = {
        "from": (None, "no-reply@mg.test.example"),
        "to": (None, "Ada Lovelace <ada@example.com>"),
        "text": (None, "multipart body"),
        "h:X-Mailgun-Variables": (None, json.dumps({"conductor_message_id": "m-mp", "conductor_token": "m-mp.3"})),
        "attachment": ("notes.txt", b"hello", "text/plain"),
    }
    response = mg.session.post(f"{mg.api}/messages", files=fields, auth=("api", API_KEY), timeout=5)
    assert response.status_code == 200, response.text
    [logged] = mg.logged(message_id="m-mp")
    assert (logged["token"], logged["to"], logged["body"]) == ("m-mp.3", "ada@example.com", "multipart body")


def test_repeated_sends_are_accepted_again_like_mailgun(mg: Mailgun):
    first, second = mg.send(message_id="m-twice"), mg.send(message_id="m-twice")
    assert first.json()["id"] != second.json()["id"]
    assert len(mg.logged(message_id="m-twice", accepted="true")) == 2


@pytest.mark.parametrize("auth", [None, ("api", "wrong"), ("user", API_KEY)])
def test_bad_credentials_are_refused_with_401(mg: Mailgun, auth):
    response = mg.send(message_id="m-auth", auth=auth)
    assert response.status_code == 401
    assert mg.events(auth=auth).status_code == 401
    [logged] = mg.logged(message_id="m-auth")
    assert not logged["accepted"] and logged["fault"] == "auth"


def test_an_unknown_domain_is_a_404(mg: Mailgun):
    response = mg.session.post(
        f"{mg.url}/v3/other.example/messages",
        data={"from": "a@b.example", "to": "ada@example.com", "text": "x"},
        auth=("api", API_KEY),
        timeout=5,
    )
    assert response.status_code == 404 and "Domain not found" in response.json()["message"]


@pytest.mark.parametrize("to", ["someone@localhost", "no-at-sign", "two@@example.com", "a@b@example.com", ""])
def test_an_invalid_address_is_a_400(mg: Mailgun, to):
    response = mg.send(to=to, message_id="m-bad")
    assert response.status_code == 400
    expected = (
        "to parameter is missing" if not to else "to parameter is not a valid address. please check documentation"
    )
    assert response.json() == {"message": expected}
    [logged] = mg.logged(message_id="m-bad")
    assert not logged["accepted"] and logged["fault"] == "invalid"


def test_a_body_is_required(mg: Mailgun):
    response = mg.send(message_id="m-nobody", text="")
    assert response.status_code == 400 and "text" in response.json()["message"]


# --- faults -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("faults", "status"), [({"outage": True}, 503), ({"error_rate": 1.0}, 500), ({"rate_429": 1.0}, 429)]
)
def test_refusals(mg: Mailgun, faults, status):
    mg.faults(**faults)
    response = mg.send(message_id="m-refused")
    assert response.status_code == status
    if status == 429:
        assert response.headers["Retry-After"] == "1"
    [logged] = mg.logged(message_id="m-refused")
    assert not logged["accepted"] and logged["provider_message_id"] is None


def test_an_outage_also_stops_the_events_api(mg: Mailgun):
    mg.faults(outage=True)
    assert mg.events().status_code == 503


def test_a_timeout_is_accepted_and_recorded_then_held(mg: Mailgun):
    mg.faults(timeout_rate=1.0, timeout_hold_ms=1500, receipt_delay_ms=5000)
    with pytest.raises(requests.ReadTimeout):
        mg.send(message_id="m-held", timeout=0.3)
    [logged] = mg.logged(message_id="m-held")
    assert logged["accepted"] and logged["fault"] == "timeout"
    events = mg.events(**{"message-id": logged["provider_message_id"]}).json()["items"]
    assert [e["event"] for e in events] == ["accepted"]


def test_latency_delays_the_answer(mg: Mailgun):
    mg.faults(latency_ms=300)
    started = time.monotonic()
    assert mg.send(message_id="m-slow").status_code == 200
    assert time.monotonic() - started >= 0.3


def names(calls: list[dict[str, Any]]) -> list[str]:
    return [call["body"]["event-data"]["event"] for call in calls]


def summary(mg: Mailgun) -> dict[str, Any]:
    return mg.session.get(f"{mg.url}/_sandbox/callbacks/summary", timeout=5).json()


def settled(mg: Mailgun) -> dict[str, int]:
    counts = wait_for(lambda: (found := summary(mg))["total"]["pending"] == 0 and found)["mailgun"]
    assert counts["scheduled"] == counts["posted_ok"] + counts["given_up"]
    assert counts["attempts"] == counts["posted_ok"] + counts["failed_attempts"]
    return counts


def test_a_drop_sends_only_accepted_and_stays_accepted(mg: Mailgun, receiver: JsonReceiver):
    mg.faults(drop_rate=1.0, receipt_delay_ms=0)
    provider_message_id = mg.send(message_id="m-drop").json()["id"]
    assert settled(mg)["posted_ok"] == 1
    assert names(receiver.events_for("m-drop")) == ["accepted"]
    items = mg.events(**{"message-id": provider_message_id}).json()["items"]
    assert [e["event"] for e in items] == ["accepted"]


def test_a_lost_receipt_still_shows_in_the_events_api(mg: Mailgun, receiver: JsonReceiver):
    mg.faults(receipt_loss_rate=1.0, receipt_delay_ms=0)
    provider_message_id = mg.send(message_id="m-lost").json()["id"]
    assert wait_for(lambda: len(mg.events(**{"message-id": provider_message_id}).json()["items"]) == 2)
    events = mg.events(**{"message-id": provider_message_id, "ascending": "yes"}).json()["items"]
    assert [e["event"] for e in events] == ["accepted", "delivered"]
    assert settled(mg)["posted_ok"] == 1
    assert names(receiver.events_for("m-lost")) == ["accepted"]


# --- signed webhooks ----------------------------------------------------------------------------
def test_accepted_at_once_then_a_signed_delivered_webhook_after_the_receipt_delay(mg: Mailgun, receiver: JsonReceiver):
    mg.faults(receipt_delay_ms=300)
    sent_at = time.monotonic()
    provider_message_id = mg.send(message_id="m-hook", **{"o:tag": "welcome"}).json()["id"]
    [accepted] = wait_for(lambda: receiver.events_for("m-hook"))
    assert names([accepted]) == ["accepted"] and accepted["body"]["event-data"]["method"] == "HTTP"
    calls = wait_for(lambda: len(receiver.events_for("m-hook")) == 2 and receiver.events_for("m-hook"))
    assert names(calls) == ["accepted", "delivered"]
    assert calls[1]["at"] - sent_at >= 0.3
    for call in calls:
        assert call["path"] == TRACKING_PATH and call["content_type"] == "application/json"
        body = call["body"]
        assert signature_ok(body) and not signature_ok(body, key="another-key")
        assert len(body["signature"]["token"]) == 50
        data = body["event-data"]
        assert data["id"] and data["recipient"] == "ada@example.com" and data["tags"] == ["welcome"]
        assert f"<{data['message']['headers']['message-id']}>" == provider_message_id
        assert data["user-variables"] == {"conductor_message_id": "m-hook", "conductor_token": "m-hook.1"}
        assert abs(data["timestamp"] - time.time()) < 5
    # The same event ids as the Events API's.
    items = mg.events(**{"message-id": provider_message_id, "ascending": "yes"}).json()["items"]
    assert [item["id"] for item in items] == [call["body"]["event-data"]["id"] for call in calls]


@pytest.mark.parametrize(
    ("receipt_status", "events"),
    [
        ("delivered", ["accepted", "delivered"]),
        ("read", ["accepted", "delivered", "opened"]),
        ("undelivered", ["accepted", "failed"]),
        ("failed", ["accepted", "rejected"]),
    ],
)
def test_each_receipt_status_becomes_mailgun_events_in_order(
    mg: Mailgun, receiver: JsonReceiver, receipt_status, events
):
    mg.faults(receipt_delay_ms=0, receipt_status=receipt_status)
    message_id = f"m-{receipt_status}"
    mg.send(message_id=message_id)
    calls = wait_for(lambda: len(receiver.events_for(message_id)) == len(events) and receiver.events_for(message_id))
    assert names(calls) == events  # in arrival order
    assert all(signature_ok(c["body"]) for c in calls)
    if receipt_status == "undelivered":
        assert calls[-1]["body"]["event-data"]["severity"] == "permanent"


@pytest.mark.parametrize(
    ("outcome", "events", "severity"),
    [
        ("hard_bounce", ["accepted", "failed"], "permanent"),
        ("soft_bounce", ["accepted", "failed", "delivered"], "temporary"),
        ("complained", ["accepted", "delivered", "complained"], None),
        ("unsubscribed", ["accepted", "delivered", "unsubscribed"], None),
    ],
)
def test_a_recipient_outcome_becomes_its_mailgun_events(mg: Mailgun, receiver: JsonReceiver, outcome, events, severity):
    """recipient_outcomes: per address, over receipt_status; other recipients are left alone."""
    mg.faults(receipt_delay_ms=0, recipient_outcomes={"gone@example.com": outcome})
    mg.send(message_id="m-outcome", to="Gone@Example.com")
    mg.send(message_id="m-other", to="ada@example.com")
    calls = wait_for(lambda: len(receiver.events_for("m-outcome")) == len(events) and receiver.events_for("m-outcome"))
    assert names(calls) == events and all(signature_ok(c["body"]) for c in calls)
    failed = [c["body"]["event-data"] for c in calls if c["body"]["event-data"]["event"] == "failed"]
    assert [data["severity"] for data in failed] == ([severity] if severity else [])
    assert names(wait_for(lambda: len(receiver.events_for("m-other")) == 2 and receiver.events_for("m-other"))) == [
        "accepted",
        "delivered",
    ]


def test_a_send_logs_its_extra_headers(mg: Mailgun):
    url = "<https://conductor.example.com/unsubscribe/t/>"
    mg.send(
        message_id="m-headers", **{"h:List-Unsubscribe": url, "h:List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
    )
    [logged] = mg.logged(message_id="m-headers")
    assert logged["headers"] == {"List-Unsubscribe": url, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}


@pytest.mark.parametrize(
    ("receipt_status", "events"), [("delivered", ["delivered"]), ("read", ["delivered", "opened"])]
)
def test_final_only_posts_the_outcome_events_alone(mg: Mailgun, receiver: JsonReceiver, receipt_status, events):
    mg.faults(receipt_delay_ms=0, receipt_status=receipt_status, callback_mode="final_only")
    mg.send(message_id="m-final-only")
    counts = settled(mg)
    assert names(receiver.events_for("m-final-only")) == events
    assert (counts["scheduled"], counts["posted_ok"]) == (len(events), len(events))


def test_a_failing_webhook_is_retried_on_the_scaled_schedule(mg: Mailgun, receiver: JsonReceiver):
    # Mailgun retries after 5 min, then 10 min; at a scale of 0.001 that is 0.3 s, then 0.6 s.
    mg.faults(receipt_delay_ms=3000, callback_retry_scale=0.001)
    with receiver.lock:
        receiver.answers = [500, 502]
    mg.send(message_id="m-retry")
    calls = wait_for(lambda: len(receiver.events_for("m-retry")) == 4 and receiver.events_for("m-retry"), timeout=10)
    assert names(calls) == ["accepted", "accepted", "accepted", "delivered"]
    assert [call["status"] for call in calls] == [500, 502, 200, 200]
    assert calls[1]["at"] - calls[0]["at"] >= 0.3 * 0.9 and calls[2]["at"] - calls[1]["at"] >= 0.6 * 0.9
    # One event, signed afresh for each attempt.
    assert len({call["body"]["event-data"]["id"] for call in calls[:3]}) == 1
    assert len({call["body"]["signature"]["token"] for call in calls[:3]}) == 3
    assert all(signature_ok(call["body"]) for call in calls)
    counts = settled(mg)
    assert (counts["posted_ok"], counts["failed_attempts"], counts["given_up"]) == (2, 2, 0)


def test_406_stops_the_retries(mg: Mailgun, receiver: JsonReceiver):
    mg.faults(receipt_delay_ms=0, callback_retry_scale=0.001)
    with receiver.lock:
        receiver.answers = [406]
    mg.send(message_id="m-406")
    counts = settled(mg)
    calls = receiver.events_for("m-406")
    assert [(c["body"]["event-data"]["event"], c["status"]) for c in calls] == [("accepted", 406), ("delivered", 200)]
    assert (counts["attempts"], counts["posted_ok"], counts["given_up"]) == (2, 1, 1)
    [refused] = [
        c for c in mg.session.get(f"{mg.url}/_sandbox/callbacks", timeout=5).json()["callbacks"] if not c["ok"]
    ]
    assert (refused["status"], refused["status_code"], refused["attempts"]) == ("accepted", 406, 1)


def test_the_delivery_notification_is_not_retried(mg: Mailgun, receiver: JsonReceiver):
    # Mailgun retries "Webhooks other than the delivery notification".
    mg.faults(receipt_delay_ms=1000, callback_retry_scale=0.001)
    mg.send(message_id="m-delivered-once")
    wait_for(lambda: receiver.events_for("m-delivered-once"))  # accepted, answered 200
    with receiver.lock:
        receiver.answers = [503]
    counts = settled(mg)
    assert [(c["body"]["event-data"]["event"], c["status"]) for c in receiver.events_for("m-delivered-once")] == [
        ("accepted", 200),
        ("delivered", 503),
    ]
    assert (counts["posted_ok"], counts["given_up"]) == (1, 1)


# --- Events API ---------------------------------------------------------------------------------
def test_events_api_filters_by_message_id_event_recipient_and_user_variables(mg: Mailgun):
    mg.faults(receipt_delay_ms=0, receipt_status="read")
    ids = {name: mg.send(message_id=name, to=f"{name}@example.com").json()["id"] for name in ("m-a", "m-b")}
    wait_for(lambda: len(mg.events(**{"message-id": ids["m-a"]}).json()["items"]) == 3)

    by_id = mg.events(**{"message-id": ids["m-a"].strip("<>"), "ascending": "yes"}).json()["items"]
    assert [e["event"] for e in by_id] == ["accepted", "delivered", "opened"]
    assert len({e["id"] for e in by_id}) == 3

    accepted = mg.events(event="accepted", recipient="m-b@example.com").json()["items"]
    assert [e["message"]["headers"]["message-id"] for e in accepted] == [ids["m-b"].strip("<>")]

    tagged = mg.events(event="accepted", **{"user-variables": json.dumps({"conductor_token": "m-a.1"})}).json()
    assert [e["user-variables"]["conductor_message_id"] for e in tagged["items"]] == ["m-a"]
    either = mg.events(event="delivered OR opened", recipient="m-a@example.com").json()["items"]
    assert {e["event"] for e in either} == {"delivered", "opened"}


def test_events_api_time_range_and_paging(mg: Mailgun):
    before = time.time()
    for n in range(5):
        mg.send(message_id=f"m-page-{n}")
    after = time.time() + 1
    first = mg.events(event="accepted", limit=2, begin=before, end=after).json()
    seen = [e["user-variables"]["conductor_message_id"] for e in first["items"]]
    url = first["paging"]["next"]
    while True:
        page = mg.session.get(url, auth=("api", API_KEY), timeout=5).json()
        if not page["items"]:
            break
        seen += [e["user-variables"]["conductor_message_id"] for e in page["items"]]
        url = page["paging"]["next"]
    assert seen == [f"m-page-{n}" for n in range(5)]  # begin < end: oldest first
    assert mg.events(event="accepted", begin=after).json()["items"][0]["user-variables"]["conductor_message_id"] == (
        "m-page-4"
    )  # begin alone: newest first
    assert mg.events(event="accepted", begin=after, end=after + 10).json()["items"] == []


@pytest.mark.parametrize("params", [{"limit": 301}, {"ascending": "maybe"}, {"colour": "red"}, {"user-variables": "{"}])
def test_events_api_refuses_bad_queries(mg: Mailgun, params):
    response = mg.events(**params)
    assert response.status_code == 400 and response.json()["message"]
