"""The sandbox provider, driven by the official twilio SDK and plain HTTP, without Django."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from providers.sandbox.app import BackgroundSandbox, SandboxConfig, start_background
from providers.sandbox.state import SandboxState
from tests.support.processes import free_port
from tests.support.webhook_receiver import WebhookReceiver

ACCOUNT_SID = "AC" + "5" * 32
AUTH_TOKEN = "sandbox-test-token"
FROM = "+15005550006"

# Every wait below polls with a deadline; this only stops a hung server from hanging the suite.
pytestmark = pytest.mark.timeout(30)


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox() -> Iterator[BackgroundSandbox]:
    server = start_background(SandboxConfig(ACCOUNT_SID, AUTH_TOKEN, seed=7))
    try:
        yield server
    finally:
        server.stop()


class Receiver(WebhookReceiver):
    """Our Twilio status-callback endpoint, as the sandbox calls it."""

    def url(self, message_id: str, token: str = "tok") -> str:
        return f"{self.base}/webhooks/twilio/status?message_id={message_id}&token={token}"

    def calls_for(self, message_id: str) -> list[dict[str, Any]]:
        return self.matching(lambda call: f"message_id={message_id}&" in call["path"])


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    try:
        yield rec
    finally:
        rec.server.shutdown()
        rec.server.server_close()


@pytest.fixture(autouse=True)
def clean_sandbox(sandbox: BackgroundSandbox) -> None:
    assert requests.post(f"{sandbox.url}/_sandbox/reset", json={"seed": 7}, timeout=5).json() == {"ok": True}


def twilio_client(sandbox: BackgroundSandbox, *, token: str = AUTH_TOKEN, timeout: float | None = None) -> Client:
    class SandboxHttpClient(TwilioHttpClient):
        # What our adapter does in production config: point the SDK at the sandbox.
        def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            return super().request(method, url.replace("https://api.twilio.com", sandbox.url), *args, **kwargs)

    return Client(ACCOUNT_SID, token, http_client=SandboxHttpClient(timeout=timeout))


@pytest.fixture
def client(sandbox: BackgroundSandbox) -> Client:
    return twilio_client(sandbox)


def set_faults(sandbox: BackgroundSandbox, **faults: Any) -> dict[str, Any]:
    response = requests.post(f"{sandbox.url}/_sandbox/faults", json={"provider": "twilio", **faults}, timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def whatsapp_writes(sandbox: BackgroundSandbox, receiver: Receiver, number: str) -> None:
    """`number` sends our WhatsApp sender a message (its webhook posted to the receiver): the
    customer-service window opens, and free-form WhatsApp messages to it go."""
    payload = {
        "provider": "twilio",
        "channel": "whatsapp",
        "from": number,
        "body": "hi",
        "url": receiver.url("inbound"),
    }
    response = requests.post(f"{sandbox.url}/_sandbox/inbound", json=payload, timeout=5)
    assert response.status_code == 200, response.text


def logged(sandbox: BackgroundSandbox, **filters: str) -> list[dict[str, Any]]:
    return requests.get(f"{sandbox.url}/_sandbox/requests", params=filters, timeout=5).json()["requests"]


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def send(client: Client, receiver: Receiver, message_id: str, to: str = "+15551230001") -> Any:
    return client.messages.create(
        to=to, from_=FROM, body=f"body of {message_id}", status_callback=receiver.url(message_id, f"token-{message_id}")
    )


def raw_send(
    sandbox: BackgroundSandbox, data: dict[str, str], auth: tuple[str, str] = (ACCOUNT_SID, AUTH_TOKEN), **kwargs: Any
) -> requests.Response:
    url = f"{sandbox.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    return requests.post(url, data=data, auth=auth, timeout=kwargs.pop("timeout", 5), **kwargs)


# --- the official SDK against the emulated API -------------------------------------------------
def test_sdk_creates_fetches_and_lists(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=5000)  # keep it `sent` while we look
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = send(client, receiver, "m-create", to="+15551230001")
    send(client, receiver, "m-other", to="+15551230002")

    assert created.sid.startswith("SM") and len(created.sid) == 34
    assert (created.status, created.account_sid) == ("queued", ACCOUNT_SID)
    assert (created.to, created.from_, created.body) == ("+15551230001", FROM, "body of m-create")
    assert (created.num_segments, created.direction) == ("1", "outbound-api")
    assert created.uri == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages/{created.sid}.json"
    assert created.date_sent is not None and created.error_code is None and created.price is None

    fetched = client.messages(created.sid).fetch()
    assert (fetched.sid, fetched.status) == (created.sid, "sent")

    listed = client.messages.list(to="+15551230001", date_sent_after=before)
    assert [m.sid for m in listed] == [created.sid]
    assert client.messages.list(to="+15551230001", date_sent_after=before + timedelta(hours=1)) == []


def test_sdk_list_pages_newest_first(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    sids = [send(client, receiver, f"m-page-{i}", to="+15551239999").sid for i in range(7)]
    today = datetime.now(UTC) - timedelta(minutes=5)
    listed = client.messages.list(to="+15551239999", date_sent_after=today, page_size=3)
    assert [m.sid for m in listed] == sids[::-1]

    first = requests.get(
        f"{sandbox.url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        params={"To": "+15551239999", "PageSize": 3},
        auth=(ACCOUNT_SID, AUTH_TOKEN),
        timeout=5,
    ).json()
    assert (first["page"], first["page_size"], first["start"], first["end"]) == (0, 3, 0, 2)
    assert first["previous_page_uri"] is None and "PageToken=" in first["next_page_uri"]


def test_sdk_fetch_unknown_is_404(client: Client) -> None:
    with pytest.raises(TwilioRestException) as exc:
        client.messages("SM" + "0" * 32).fetch()
    assert (exc.value.status, exc.value.code) == (404, 20404)


def test_sdk_invalid_number_is_21211(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    with pytest.raises(TwilioRestException) as exc:
        send(client, receiver, "m-invalid", to="12345")
    assert (exc.value.status, exc.value.code) == (400, 21211)
    assert "12345" in exc.value.msg
    [entry] = logged(sandbox, message_id="m-invalid")
    assert (entry["accepted"], entry["fault"], entry["status_code"]) == (False, "invalid", 400)


def test_sdk_bad_credentials_is_401(sandbox: BackgroundSandbox, receiver: Receiver) -> None:
    with pytest.raises(TwilioRestException) as exc:
        send(twilio_client(sandbox, token="wrong"), receiver, "m-auth")
    assert (exc.value.status, exc.value.code) == (401, 20003)
    assert logged(sandbox, message_id="m-auth")[0]["fault"] == "auth"


@pytest.mark.parametrize(
    ("data", "code"),
    [({"To": "+15551230001", "From": FROM}, 21602), ({"To": "+15551230001", "Body": "x"}, 21603)],
)
def test_missing_fields_are_refused(sandbox: BackgroundSandbox, data: dict[str, str], code: int) -> None:
    response = raw_send(sandbox, data)
    assert response.status_code == 400
    assert response.json()["code"] == code and response.json()["status"] == 400


# --- status callbacks ---------------------------------------------------------------------------------
def statuses(calls: list[dict[str, Any]]) -> list[str]:
    return [call["params"]["MessageStatus"] for call in calls]


def signed_by_twilio(receiver: Receiver, call: dict[str, Any]) -> bool:
    return RequestValidator(AUTH_TOKEN).validate(
        receiver.base + call["path"], call["params"], call["headers"]["X-Twilio-Signature"]
    )


def callbacks(sandbox: BackgroundSandbox) -> dict[str, Any]:
    return requests.get(f"{sandbox.url}/_sandbox/callbacks", timeout=5).json()


def summary(sandbox: BackgroundSandbox) -> dict[str, Any]:
    return requests.get(f"{sandbox.url}/_sandbox/callbacks/summary", timeout=5).json()


def settled(sandbox: BackgroundSandbox) -> dict[str, Any]:
    """The counters once nothing is pending (they must add up at every moment)."""
    counts = wait_for(lambda: (found := summary(sandbox))["total"]["pending"] == 0 and found)
    for name in ("total", "twilio", "vonage", "mailgun"):
        c = counts[name]
        assert c["scheduled"] == c["posted_ok"] + c["given_up"] + c["pending"], (name, c)
        assert c["attempts"] == c["posted_ok"] + c["failed_attempts"], (name, c)
    return counts


def test_sms_gets_sent_then_delivered_each_signed_and_attributed(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=50)
    sid = send(client, receiver, "m-cb").sid
    calls = wait_for(lambda: len(receiver.calls_for("m-cb")) == 2 and receiver.calls_for("m-cb"))

    assert statuses(calls) == ["sent", "delivered"] and calls[0]["at"] <= calls[1]["at"]
    assert all(signed_by_twilio(receiver, call) for call in calls)
    url = receiver.base + calls[1]["path"]
    assert parse_qs(urlsplit(url).query) == {"message_id": ["m-cb"], "token": ["token-m-cb"]}
    assert calls[1]["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    common = {"MessageSid": sid, "SmsSid": sid, "AccountSid": ACCOUNT_SID, "From": FROM, "To": "+15551230001"}
    assert calls[0]["params"] == {**common, "SmsStatus": "sent", "MessageStatus": "sent", "ApiVersion": "2010-04-01"}
    delivered = calls[1]["params"]
    assert delivered == {
        **common,
        "SmsStatus": "delivered",
        "MessageStatus": "delivered",
        "ApiVersion": "2010-04-01",
        "RawDlrDoneDate": delivered["RawDlrDoneDate"],
    }
    assert len(delivered["RawDlrDoneDate"]) == 10 and delivered["RawDlrDoneDate"].isdigit()  # YYMMDDhhmm
    tokens = [call["headers"]["I-Twilio-Idempotency-Token"] for call in calls]
    assert len(set(tokens)) == 2
    assert client.messages(sid).fetch().status == "delivered"
    # Each answered POST is timed, as a provider would see the receiver.
    latency = summary(sandbox)["latency_ms"]
    assert latency["count"] == 2 and 0 < latency["p50"] <= latency["max"] < 5000
    logged = wait_for(lambda: len(callbacks(sandbox)["callbacks"]) == 2 and callbacks(sandbox)["callbacks"])
    assert [(c["status"], c["ok"], c["attempts"], c["status_code"]) for c in logged] == [
        ("sent", True, 1, 200),
        ("delivered", True, 1, 200),
    ]


def test_final_only_posts_the_final_status_alone(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=0, callback_mode="final_only")
    send(client, receiver, "m-final-only")
    send(client, receiver, "m-final-only-sentinel")  # after it: once the sentinel is in, so is all of it
    wait_for(lambda: receiver.calls_for("m-final-only-sentinel"))
    [call] = receiver.calls_for("m-final-only")
    assert call["params"]["MessageStatus"] == "delivered" and signed_by_twilio(receiver, call)


def test_whatsapp_read_receipt(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, receipt_status="read")
    whatsapp_writes(sandbox, receiver, "+15551230003")
    sid = send(client, receiver, "m-wa", to="whatsapp:+15551230003").sid
    calls = wait_for(lambda: len(receiver.calls_for("m-wa")) == 3 and receiver.calls_for("m-wa"))
    assert statuses(calls) == ["sent", "delivered", "read"]
    assert all(signed_by_twilio(receiver, call) and "ErrorCode" not in call["params"] for call in calls)
    assert all("RawDlrDoneDate" not in call["params"] for call in calls)  # an SMS carrier's receipt
    assert client.messages(sid).fetch().status == "read"
    assert logged(sandbox, message_id="m-wa")[0]["channel"] == "whatsapp"


def test_a_free_form_whatsapp_outside_the_window_is_accepted_then_fails_with_63016(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    # As Twilio: the request is taken (201, queued), then the status callback says failed, 63016.
    set_faults(sandbox, receipt_delay_ms=0)
    sid = send(client, receiver, "m-wa-closed", to="whatsapp:+15551230005").sid
    [call] = wait_for(lambda: receiver.calls_for("m-wa-closed"))
    assert (call["params"]["MessageStatus"], call["params"]["ErrorCode"]) == ("failed", "63016")
    assert signed_by_twilio(receiver, call)
    fetched = client.messages(sid).fetch()
    assert (fetched.status, fetched.error_code) == ("failed", 63016)
    [entry] = logged(sandbox, message_id="m-wa-closed")
    assert (entry["accepted"], entry["fault"]) == (True, "outside_session_window")
    # Once the number writes, free-form messages to it go.
    whatsapp_writes(sandbox, receiver, "+15551230005")
    send(client, receiver, "m-wa-open", to="whatsapp:+15551230005")
    calls = wait_for(lambda: len(receiver.calls_for("m-wa-open")) == 2 and receiver.calls_for("m-wa-open"))
    assert statuses(calls) == ["sent", "delivered"]


def test_a_template_goes_outside_the_window_and_is_logged_with_its_variables(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=0)
    content_sid = "HX" + "a1" * 16
    client.messages.create(
        to="whatsapp:+15551230006",
        from_=FROM,
        content_sid=content_sid,
        content_variables='{"1":"Ada","2":"12:30"}',
        status_callback=receiver.url("m-wa-template"),
    )
    calls = wait_for(lambda: len(receiver.calls_for("m-wa-template")) == 2 and receiver.calls_for("m-wa-template"))
    assert statuses(calls) == ["sent", "delivered"]
    [entry] = logged(sandbox, message_id="m-wa-template")
    assert (entry["content_sid"], entry["content_variables"], entry["fault"]) == (
        content_sid,
        {"1": "Ada", "2": "12:30"},
        "none",
    )


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"ContentVariables": '{"1":"x"}'}, 21654),  # variables without a template
        ({"ContentSid": "HX123"}, 21655),
        ({"ContentSid": "HX" + "0" * 32, "ContentVariables": "not json"}, 21656),
        ({"ContentSid": "HX" + "0" * 32, "ContentVariables": '{"1":""}'}, 21656),  # an empty value
    ],
)
def test_a_bad_template_request_is_refused_as_twilio_refuses_it(
    sandbox: BackgroundSandbox, fields: dict[str, str], code: int
) -> None:
    response = raw_send(sandbox, {"To": "whatsapp:+15551230007", "From": FROM, **fields})
    assert (response.status_code, response.json()["code"]) == (400, code)


def test_the_window_can_be_left_unenforced(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, whatsapp_session_hours=0)
    send(client, receiver, "m-wa-unenforced", to="whatsapp:+15551230008")
    calls = wait_for(lambda: len(receiver.calls_for("m-wa-unenforced")) == 2 and receiver.calls_for("m-wa-unenforced"))
    assert statuses(calls) == ["sent", "delivered"]


def test_an_sms_is_never_read(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, receipt_status="read")
    sid = send(client, receiver, "m-sms-read").sid
    send(client, receiver, "m-sms-read-sentinel")
    wait_for(lambda: len(receiver.calls_for("m-sms-read-sentinel")) == 2)
    assert statuses(receiver.calls_for("m-sms-read")) == ["sent", "delivered"]
    assert client.messages(sid).fetch().status == "delivered"


def test_undelivered_receipt_carries_error_code(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, receipt_status="undelivered")
    sid = send(client, receiver, "m-undel").sid
    sent, undelivered = wait_for(lambda: len(receiver.calls_for("m-undel")) == 2 and receiver.calls_for("m-undel"))
    assert "ErrorCode" not in sent["params"]
    assert (undelivered["params"]["MessageStatus"], undelivered["params"]["ErrorCode"]) == ("undelivered", "30003")
    assert client.messages(sid).fetch().error_code == 30003


def test_a_message_that_could_not_be_sent_gets_failed_alone(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=0, receipt_status="failed")
    send(client, receiver, "m-failed")
    set_faults(sandbox, receipt_status="delivered")
    send(client, receiver, "m-failed-sentinel")
    wait_for(lambda: len(receiver.calls_for("m-failed-sentinel")) == 2)
    [call] = receiver.calls_for("m-failed")
    assert (call["params"]["MessageStatus"], call["params"]["ErrorCode"]) == ("failed", "30008")


def test_each_messages_callbacks_arrive_in_order(sandbox: BackgroundSandbox, receiver: Receiver) -> None:
    # Every callback of 60 WhatsApp messages falls due at once: each message's still come in order.
    set_faults(sandbox, receipt_delay_ms=0, receipt_status="read")
    whatsapp_writes(sandbox, receiver, "+15551230004")
    ids = [f"m-order-{i}" for i in range(60)]
    for message_id in ids:
        data = {"To": "whatsapp:+15551230004", "From": FROM, "Body": "x", "StatusCallback": receiver.url(message_id)}
        assert raw_send(sandbox, data).status_code == 201
    wait_for(lambda: all(len(receiver.calls_for(i)) == 3 for i in ids), timeout=15)
    assert all(statuses(receiver.calls_for(i)) == ["sent", "delivered", "read"] for i in ids)
    assert settled(sandbox)["twilio"] == {
        "scheduled": 180,
        "posted_ok": 180,
        "attempts": 180,
        "failed_attempts": 0,
        "given_up": 0,
        "pending": 0,
    }


def test_a_5xx_answer_is_not_retried_by_default(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    # Twilio's default retry policy (rp=ct) retries a failed connection only.
    set_faults(sandbox, receipt_delay_ms=0)
    with receiver.lock:
        receiver.answers = [500]
    send(client, receiver, "m-500")
    wait_for(lambda: len(receiver.calls_for("m-500")) == 2)
    counts = settled(sandbox)["twilio"]
    assert [c["status"] for c in receiver.calls_for("m-500")] == [500, 200]  # `sent` lost, `delivered` came
    assert (counts["scheduled"], counts["posted_ok"], counts["failed_attempts"], counts["given_up"]) == (2, 1, 1, 1)
    [lost] = [c for c in callbacks(sandbox)["callbacks"] if not c["ok"]]
    assert (lost["status"], lost["attempts"], lost["status_code"], lost["error"]) == ("sent", 1, 500, "HTTP 500")


def test_a_refused_connection_is_retried_once_by_default(sandbox: BackgroundSandbox, client: Client) -> None:
    set_faults(sandbox, receipt_delay_ms=0)
    url = f"http://127.0.0.1:{free_port()}/webhooks/twilio/?message_id=m-down&token=t"
    client.messages.create(to="+15551230001", from_=FROM, body="x", status_callback=url)
    counts = settled(sandbox)["twilio"]
    assert (counts["scheduled"], counts["attempts"], counts["given_up"]) == (2, 4, 2)  # rc=1: two tries each
    assert {(c["attempts"], c["ok"]) for c in callbacks(sandbox)["callbacks"]} == {(2, False)}


def test_connection_overrides_retry_a_5xx_with_the_same_signed_callback(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=0)
    with receiver.lock:
        receiver.answers = [500, 503]
    url = receiver.url("m-rc") + "#rc=3&rp=all&ct=1000"
    client.messages.create(to="+15551230001", from_=FROM, body="x", status_callback=url)
    calls = wait_for(lambda: len(receiver.calls_for("m-rc")) == 4 and receiver.calls_for("m-rc"))
    assert [c["status"] for c in calls] == [500, 503, 200, 200]
    assert statuses(calls) == ["sent", "sent", "sent", "delivered"]  # the next waits for the retries
    assert all(signed_by_twilio(receiver, call) for call in calls)  # signed without the fragment
    assert len({call["headers"]["I-Twilio-Idempotency-Token"] for call in calls[:3]}) == 1
    assert settled(sandbox)["twilio"]["given_up"] == 0
    assert [c["attempts"] for c in callbacks(sandbox)["callbacks"]] == [3, 1]


def test_final_only_keeps_the_old_quick_retries(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, callback_mode="final_only")
    with receiver.lock:
        receiver.answers = [500, 503]
    send(client, receiver, "m-retry")
    calls = wait_for(lambda: len(receiver.calls_for("m-retry")) == 3 and receiver.calls_for("m-retry"))
    assert [c["status"] for c in calls] == [500, 503, 200]
    cb = wait_for(lambda: callbacks(sandbox)["callbacks"])[0]
    assert (cb["ok"], cb["attempts"]) == (True, 3)


# --- faults -----------------------------------------------------------------------------------------
def test_outage_refuses_everything(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, outage=True)
    with pytest.raises(TwilioRestException) as exc:
        send(client, receiver, "m-outage")
    assert (exc.value.status, exc.value.code) == (503, 20503)
    with pytest.raises(TwilioException, match="503"):  # the SDK's pages raise the base exception
        client.messages.list(to="+15551230001")
    [entry] = logged(sandbox, message_id="m-outage")
    assert (entry["accepted"], entry["fault"], entry["provider_message_id"]) == (False, "outage", None)


@pytest.mark.parametrize(("fault", "status", "code"), [("error_rate", 500, 20500), ("rate_429", 429, 20429)])
def test_refusal_faults(sandbox: BackgroundSandbox, fault: str, status: int, code: int) -> None:
    set_faults(sandbox, **{fault: 1.0})
    response = raw_send(
        sandbox,
        {
            "To": "+15551230001",
            "From": FROM,
            "Body": "x",
            "StatusCallback": "http://127.0.0.1:9/cb?message_id=m-refused&token=t",
        },
    )
    assert (response.status_code, response.json()["code"]) == (status, code)
    if status == 429:
        assert response.headers["Retry-After"] == "1"
    [entry] = logged(sandbox, message_id="m-refused")
    assert (entry["accepted"], entry["fault"]) == (False, "error" if status == 500 else "rate_429")


def test_latency_applies(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, latency_ms=300, outage=True)
    started = time.monotonic()
    assert raw_send(sandbox, {"To": "+15551230001", "From": FROM, "Body": "x"}).status_code == 503
    assert time.monotonic() - started >= 0.3


def test_timeout_is_accepted_but_unanswered(sandbox: BackgroundSandbox, receiver: Receiver) -> None:
    set_faults(sandbox, timeout_rate=1.0, timeout_hold_ms=2000)
    with pytest.raises(requests.exceptions.Timeout):
        send(twilio_client(sandbox, timeout=0.5), receiver, "m-timeout")
    [entry] = logged(sandbox, message_id="m-timeout")
    assert (entry["accepted"], entry["fault"], entry["status_code"]) == (True, "timeout", 201)
    assert entry["provider_message_id"].startswith("SM")


def test_drop_sends_only_sent_and_stays_sent(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    set_faults(sandbox, drop_rate=1.0, receipt_delay_ms=100)
    dropped = send(client, receiver, "m-drop").sid
    # A sentinel sent afterwards with the same delay: once its receipt is in, the dropped one's
    # would have been too, so no fixed sleep is needed.
    set_faults(sandbox, drop_rate=0)
    send(client, receiver, "m-drop-sentinel")
    wait_for(lambda: len(receiver.calls_for("m-drop-sentinel")) == 2)
    assert statuses(receiver.calls_for("m-drop")) == ["sent"]
    assert client.messages(dropped).fetch().status == "sent"
    assert logged(sandbox, message_id="m-drop")[0]["fault"] == "drop"


def test_drop_rules_drop_silently_to_one_prefix_only(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, drop_rules=[{"prefix": "+44", "rate": 1.0}], receipt_delay_ms=100)
    british = send(client, receiver, "m-gb", to="+447400123456").sid
    send(client, receiver, "m-us", to="+15551230001")
    wait_for(lambda: len(receiver.calls_for("m-us")) == 2)
    assert statuses(receiver.calls_for("m-gb")) == ["sent"]  # accepted with 201, then silence
    assert client.messages(british).fetch().status == "sent"
    assert logged(sandbox, message_id="m-gb")[0]["fault"] == "drop"
    assert logged(sandbox, message_id="m-us")[0]["fault"] == "none"


def test_the_longest_matching_drop_rule_wins_over_drop_rate() -> None:
    state = SandboxState(seed=1)
    rules = [{"prefix": "+44", "rate": 0.3}, {"prefix": "+447", "rate": 0.9}]
    state.faults["twilio"] = state.faults["twilio"].updated({"drop_rate": 0.05, "drop_rules": rules})
    assert state.drop_rate_for("twilio", "+447400123456") == 0.9
    assert state.drop_rate_for("twilio", "whatsapp:+441234567890") == 0.3
    assert state.drop_rate_for("twilio", "+15551230001") == 0.05
    assert state.drop_rate_for("twilio", None) == 0.05


def test_receipt_loss_loses_the_final_status_but_is_delivered(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_loss_rate=1.0, receipt_delay_ms=100)
    lost = send(client, receiver, "m-lost").sid
    set_faults(sandbox, receipt_loss_rate=0)
    send(client, receiver, "m-lost-sentinel")
    wait_for(lambda: len(receiver.calls_for("m-lost-sentinel")) == 2)
    assert statuses(receiver.calls_for("m-lost")) == ["sent"]
    assert client.messages(lost).fetch().status == "delivered"
    assert logged(sandbox, message_id="m-lost")[0]["fault"] == "receipt_loss"


def test_receipt_loss_in_final_only_sends_nothing(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_loss_rate=1.0, receipt_delay_ms=100, callback_mode="final_only")
    send(client, receiver, "m-lost-final")
    set_faults(sandbox, receipt_loss_rate=0)
    send(client, receiver, "m-lost-final-sentinel")
    wait_for(lambda: receiver.calls_for("m-lost-final-sentinel"))
    assert receiver.calls_for("m-lost-final") == []


def test_reset_cancels_pending_receipts_and_zeroes_the_counters(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=500)
    send(client, receiver, "m-cancelled")
    assert summary(sandbox)["total"]["pending"] == 2
    assert requests.post(f"{sandbox.url}/_sandbox/reset", timeout=5).json() == {"ok": True}
    assert summary(sandbox)["total"] == dict.fromkeys(
        ("scheduled", "posted_ok", "attempts", "failed_attempts", "given_up", "pending"), 0
    )
    set_faults(sandbox, receipt_delay_ms=500)
    send(client, receiver, "m-reset-sentinel")  # due after the cancelled one would have been
    wait_for(lambda: len(receiver.calls_for("m-reset-sentinel")) == 2)
    assert receiver.calls_for("m-cancelled") == []
    assert logged(sandbox, message_id="m-cancelled") == []
    assert settled(sandbox)["twilio"]["posted_ok"] == 2


# --- control API --------------------------------------------------------------------------------------
def test_fault_settings_defaults_and_partial_update(sandbox: BackgroundSandbox) -> None:
    faults = requests.get(f"{sandbox.url}/_sandbox/faults", timeout=5).json()
    assert set(faults) == {"twilio", "vonage", "mailgun"}
    assert faults["vonage"] == {
        "error_rate": 0.0,
        "rate_429": 0.0,
        "latency_ms": 0,
        "latency_max_ms": 0,
        "timeout_rate": 0.0,
        "timeout_hold_ms": 15000,
        "outage": False,
        "drop_rate": 0.0,
        "drop_rules": [],
        "receipt_loss_rate": 0.0,
        "receipt_delay_ms": 200,
        "receipt_status": "delivered",
        "max_per_second": 0,
        "callback_mode": "realistic",
        "callback_retry_scale": 0.01,
        "recipient_outcomes": {},
        "opted_out": [],
        "whatsapp_session_hours": 24.0,
    }
    set_faults(sandbox, error_rate=0.3, latency_ms=50)
    updated = set_faults(sandbox, outage=True)
    assert (updated["error_rate"], updated["latency_ms"], updated["outage"]) == (0.3, 50, True)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"provider": "twilio", "error_rate": 1.5}, "error_rate"),
        ({"provider": "twilio", "rate_429": "0.1"}, "rate_429"),
        ({"provider": "twilio", "latency_ms": -1}, "latency_ms"),
        ({"provider": "twilio", "receipt_status": "lost"}, "receipt_status"),
        ({"provider": "mailgun", "recipient_outcomes": {"ada@example.com": "lost"}}, "recipient_outcomes"),
        ({"provider": "mailgun", "recipient_outcomes": ["ada@example.com"]}, "recipient_outcomes"),
        ({"provider": "twilio", "outage": 1}, "outage"),
        ({"provider": "twilio", "eror_rate": 0.1}, "eror_rate"),
        ({"provider": "twilio", "callback_mode": "all"}, "callback_mode"),
        ({"provider": "twilio", "callback_retry_scale": 2}, "callback_retry_scale"),
        ({"provider": "twilio", "callback_retry_scale": -0.1}, "callback_retry_scale"),
        ({"error_rate": 0.1}, "provider"),
        ({"provider": "sinch"}, "provider"),
        ({"provider": "twilio", "drop_rules": {"+44": 0.3}}, "drop_rules"),
        ({"provider": "twilio", "drop_rules": [{"prefix": "44", "rate": 0.3}]}, "drop_rules"),
        ({"provider": "twilio", "drop_rules": [{"prefix": "+44", "rate": 1.5}]}, "drop_rules"),
        ({"provider": "twilio", "drop_rules": [{"prefix": "+44", "rate": 0.3, "to": "x"}]}, "drop_rules"),
    ],
)
def test_fault_validation_names_the_field(sandbox: BackgroundSandbox, payload: dict[str, Any], field: str) -> None:
    response = requests.post(f"{sandbox.url}/_sandbox/faults", json=payload, timeout=5)
    assert response.status_code == 400
    assert response.json()["field"] == field and response.json()["error"]
    # A refused update changes nothing.
    assert requests.get(f"{sandbox.url}/_sandbox/faults", timeout=5).json()["twilio"]["error_rate"] == 0


def test_request_log_filters(sandbox: BackgroundSandbox, client: Client, receiver: Receiver) -> None:
    send(client, receiver, "m-a", to="+15551110001")
    send(client, receiver, "m-a", to="+15551110001")  # a resend is accepted again, as on Twilio
    send(client, receiver, "m-b", to="+15551110002")
    set_faults(sandbox, error_rate=1.0)
    with pytest.raises(TwilioRestException):
        send(client, receiver, "m-b", to="+15551110002")

    assert len(logged(sandbox)) == 4
    assert [r["to"] for r in logged(sandbox, message_id="m-a")] == ["+15551110001"] * 2
    assert len({r["provider_message_id"] for r in logged(sandbox, message_id="m-a")}) == 2
    assert len(logged(sandbox, to="+15551110002")) == 2
    assert len(logged(sandbox, provider="twilio")) == 4 and logged(sandbox, provider="vonage") == []
    refused = logged(sandbox, message_id="m-b", accepted="false")
    assert [(r["fault"], r["status_code"], r["token"]) for r in refused] == [("error", 500, "token-m-b")]
    assert len(logged(sandbox, accepted="true")) == 3
    entry = logged(sandbox, message_id="m-b", accepted="true")[0]
    assert datetime.fromisoformat(entry["received_at"]).tzinfo is not None
    assert (entry["provider"], entry["channel"], entry["body"]) == ("twilio", "sms", "body of m-b")


def test_healthz(sandbox: BackgroundSandbox) -> None:
    assert requests.get(f"{sandbox.url}/_sandbox/healthz", timeout=5).json() == {"ok": True}


def test_max_per_second_answers_429_beyond_the_providers_capacity(sandbox: BackgroundSandbox, client: Client) -> None:
    set_faults(sandbox, max_per_second=5)
    codes = []
    for _ in range(8):
        try:
            client.messages.create(to="+14155552671", from_="+15005550006", body="burst")
            codes.append(201)
        except TwilioRestException as exc:
            codes.append(exc.status)
    assert codes.count(201) == 5 and codes.count(429) == 3


def test_reset_empties_the_capacity_window(sandbox: BackgroundSandbox, client: Client) -> None:
    set_faults(sandbox, max_per_second=2)
    for _ in range(2):
        client.messages.create(to="+14155552671", from_="+15005550006", body="before the reset")
    requests.post(f"{sandbox.url}/_sandbox/reset", json={}, timeout=5).raise_for_status()
    set_faults(sandbox, max_per_second=2)
    # Within the same second: the sends before the reset must not make these 429.
    for _ in range(2):
        client.messages.create(to="+14155552671", from_="+15005550006", body="after the reset")


# --- opt-outs -------------------------------------------------------------------------------------
def test_an_opted_out_number_is_refused_with_21610_and_opts_back_in(sandbox: BackgroundSandbox, client: Client) -> None:
    from providers.sandbox.state import STATE_KEY

    receiver_url = "http://127.0.0.1:9/cb?message_id={}&token=t"
    form = {"To": "+15551230009", "From": FROM, "Body": "x"}
    assert set_faults(sandbox, opted_out=["+15551230009"])["opted_out"] == ["+15551230009"]
    assert set_faults(sandbox, latency_ms=0)["opted_out"] == ["+15551230009"]  # omitted: kept
    response = raw_send(sandbox, {**form, "StatusCallback": receiver_url.format("m-stop")})
    # Twilio's error body: code, message, more_info, status.
    assert response.status_code == 400
    assert response.json() == {
        "code": 21610,
        "message": "Attempt to send to unsubscribed recipient",
        "more_info": "https://www.twilio.com/docs/errors/21610",
        "status": 400,
    }
    [entry] = logged(sandbox, message_id="m-stop")
    assert (entry["accepted"], entry["fault"], entry["status_code"]) == (False, "opted_out", 400)
    # Another number goes out; WhatsApp to the same number is not an SMS opt-out.
    assert raw_send(sandbox, {**form, "To": "+15551230008"}).status_code == 201
    assert raw_send(sandbox, {**form, "To": "whatsapp:+15551230009", "From": "whatsapp:" + FROM}).status_code == 201

    state = sandbox.app[STATE_KEY]
    state.opt_in("twilio", "+15551230009")
    assert raw_send(sandbox, form).status_code == 201
    state.opt_out("twilio", "+15551230009")
    state.opt_out("twilio", "+15551230009")  # idempotent
    assert requests.get(f"{sandbox.url}/_sandbox/faults", timeout=5).json()["twilio"]["opted_out"] == ["+15551230009"]
    assert raw_send(sandbox, form).status_code == 400
    requests.post(f"{sandbox.url}/_sandbox/reset", json={}, timeout=5)
    assert requests.get(f"{sandbox.url}/_sandbox/faults", timeout=5).json()["twilio"]["opted_out"] == []


@pytest.mark.parametrize("value", ["+15551230009", ["15551230009"], [1], None])
def test_opted_out_must_be_a_list_of_e164_numbers(sandbox: BackgroundSandbox, value: Any) -> None:
    response = requests.post(
        f"{sandbox.url}/_sandbox/faults", json={"provider": "twilio", "opted_out": value}, timeout=5
    )
    assert response.status_code == 400 and response.json()["field"] == "opted_out"


# --- ValidityPeriod (docs/deadlines.md) ---------------------------------------------------------
def test_a_validity_that_runs_out_before_delivery_fails_with_30036_when_it_ends(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=5000)  # delivery held 5 s; the validity is 1 s
    started = time.monotonic()
    sid = client.messages.create(
        to="+15551230001",
        from_=FROM,
        body="code 1",
        status_callback=receiver.url("m-validity", "token-m-validity"),
        validity_period=1,
    ).sid
    [entry] = logged(sandbox, message_id="m-validity")
    assert entry["validity_period"] == "1"  # the request log keeps what the request asked
    [call] = wait_for(lambda: receiver.calls_for("m-validity"))
    assert 0.9 <= time.monotonic() - started < 4  # when the validity ended, not at the delivery
    assert (call["params"]["MessageStatus"], call["params"]["ErrorCode"]) == ("failed", "30036")
    fetched = client.messages(sid).fetch()
    assert (fetched.status, fetched.error_code, fetched.error_message) == ("failed", 30036, "Validity Period Expired")


def test_a_validity_longer_than_the_delay_is_delivered(
    sandbox: BackgroundSandbox, client: Client, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=0)
    client.messages.create(
        to="+15551230001", from_=FROM, body="code 2", status_callback=receiver.url("m-valid"), validity_period=60
    )
    calls = wait_for(lambda: len(receiver.calls_for("m-valid")) == 2 and receiver.calls_for("m-valid"))
    assert statuses(calls) == ["sent", "delivered"]
    [entry] = logged(sandbox, message_id="m-valid")
    assert entry["validity_period"] == "60"


@pytest.mark.parametrize("value", ["0", "36001", "1.5", "soon"])
def test_a_validity_period_out_of_range_is_21624(sandbox: BackgroundSandbox, value: str) -> None:
    data = {"To": "+15551230001", "From": FROM, "Body": "x", "ValidityPeriod": value}
    response = raw_send(sandbox, data)
    assert response.status_code == 400 and response.json()["code"] == 21624
