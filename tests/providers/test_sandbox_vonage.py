"""The sandbox's Vonage emulation over raw HTTP: SMS API wire format, faults, signed DLRs, Reports API."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from vonage_http_client import Auth

from providers.sandbox import vonage_api
from providers.sandbox.app import BackgroundSandbox, SandboxConfig, start_background
from tests.support.processes import free_port
from tests.support.webhook_receiver import WebhookReceiver

API_KEY = "abcd1234"
API_SECRET = "sandbox-test-secret"
SIGNATURE_SECRET = "sandbox-test-signature-secret"
RECIPIENT = "15551230001"

# Every wait below polls with a deadline; this only stops a hung server from hanging the suite.
pytestmark = pytest.mark.timeout(30)


# --- fixtures ----------------------------------------------------------------------------------
def config(method: str = "sha256") -> SandboxConfig:
    return SandboxConfig(
        "AC" + "5" * 32,
        "twilio-token",
        seed=7,
        vonage_api_key=API_KEY,
        vonage_api_secret=API_SECRET,
        vonage_signature_secret=SIGNATURE_SECRET,
        vonage_signature_method=method,
    )


@pytest.fixture(scope="module")
def sandbox() -> Iterator[BackgroundSandbox]:
    server = start_background(config())
    try:
        yield server
    finally:
        server.stop()


class Receiver(WebhookReceiver):
    """Our Vonage DLR endpoint, as the sandbox calls it."""

    @property
    def url(self) -> str:
        return f"{self.base}/webhooks/vonage/"

    def calls_for(self, token: str) -> list[dict[str, Any]]:
        return self.matching(lambda call: call["params"].get("client-ref") == token)


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


def set_faults(sandbox: BackgroundSandbox, **faults: Any) -> None:
    response = requests.post(f"{sandbox.url}/_sandbox/faults", json={"provider": "vonage", **faults}, timeout=5)
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


def sms(
    sandbox: BackgroundSandbox,
    token: str,
    *,
    receiver: Receiver | None = None,
    json_body: bool = False,
    timeout: float = 5,
    **overrides: str,
) -> requests.Response:
    """POST /sms/json with api_key/api_secret in the body, as form (or JSON)."""
    params = {"api_key": API_KEY, "api_secret": API_SECRET, "from": "Conductor", "to": RECIPIENT}
    params |= {"text": f"body of {token}", "client-ref": token}
    if receiver is not None:
        params["callback"] = receiver.url
    params.update(overrides)
    if json_body:
        return requests.post(f"{sandbox.url}/sms/json", json=params, timeout=timeout)
    return requests.post(f"{sandbox.url}/sms/json", data=params, timeout=timeout)


def records(sandbox: BackgroundSandbox, auth: tuple[str, str] = (API_KEY, API_SECRET), **query: str) -> Any:
    params = {"account_id": API_KEY, "product": "SMS", "direction": "outbound", **query}
    return requests.get(f"{sandbox.url}/v2/reports/records", params=params, auth=auth, timeout=5)


def window(minutes: int = 5) -> dict[str, str]:
    now = datetime.now(UTC)
    start, end = now - timedelta(minutes=minutes), now + timedelta(minutes=1)
    return {"date_start": start.strftime("%Y-%m-%dT%H:%M:%S+0000"), "date_end": end.isoformat()}


# --- POST /sms/json ------------------------------------------------------------------------------
@pytest.mark.parametrize("json_body", [False, True])
def test_an_accepted_send_has_vonages_wire_format_and_is_attributed(
    sandbox: BackgroundSandbox, json_body: bool
) -> None:
    response = sms(sandbox, "m-wire.1", json_body=json_body)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("application/json")
    payload = response.json()
    [message] = payload["messages"]
    assert payload["message-count"] == "1"
    assert set(message) == {"to", "message-id", "status", "remaining-balance", "message-price", "network", "client-ref"}
    assert (message["to"], message["status"], message["client-ref"]) == (RECIPIENT, "0", "m-wire.1")
    assert uuid.UUID(message["message-id"])

    [entry] = logged(sandbox, message_id="m-wire")
    assert (entry["provider"], entry["token"], entry["to"], entry["body"]) == (
        "vonage",
        "m-wire.1",
        f"+{RECIPIENT}",
        "body of m-wire.1",
    )
    assert (entry["accepted"], entry["status_code"], entry["fault"]) == (True, 200, "none")
    assert entry["provider_message_id"] == message["message-id"]


def test_basic_auth_as_the_sdk_sends_it_and_a_resend_is_accepted_again(sandbox: BackgroundSandbox) -> None:
    data = {"from": "Conductor", "to": f"+{RECIPIENT}", "text": "hi", "client-ref": "m-basic.1"}
    for _ in range(2):
        response = requests.post(f"{sandbox.url}/sms/json", data=data, auth=(API_KEY, API_SECRET), timeout=5)
        assert response.json()["messages"][0]["status"] == "0"
    assert len({e["provider_message_id"] for e in logged(sandbox, message_id="m-basic")}) == 2


@pytest.mark.parametrize(
    ("overrides", "status", "text", "fault"),
    [
        ({"api_secret": "wrong"}, "4", "Bad Credentials", "auth"),
        ({"to": ""}, "2", "Missing to param", "invalid"),
        ({"text": ""}, "2", "Missing text param", "invalid"),
        ({"to": "+1234"}, "3", "Invalid to address", "invalid"),
        ({"callback": "http://127.0.0.1/" + "x" * 100}, "23", "Invalid Callback Url", "invalid"),
    ],
)
def test_refusals_are_per_message_statuses(
    sandbox: BackgroundSandbox, overrides: dict[str, str], status: str, text: str, fault: str
) -> None:
    response = sms(sandbox, "m-ref.1", **overrides)
    assert response.status_code == 200
    assert response.json() == {"message-count": "1", "messages": [{"status": status, "error-text": text}]}
    [entry] = logged(sandbox, message_id="m-ref")
    assert (entry["accepted"], entry["fault"], entry["provider_message_id"]) == (False, fault, None)


def test_no_credentials_at_all_is_missing_api_key(sandbox: BackgroundSandbox) -> None:
    data = {"from": "Conductor", "to": RECIPIENT, "text": "x", "client-ref": "m-anon.1"}
    response = requests.post(f"{sandbox.url}/sms/json", data=data, timeout=5)
    assert response.json()["messages"] == [{"status": "2", "error-text": "Missing api_key"}]
    assert logged(sandbox, message_id="m-anon")[0]["fault"] == "auth"


# --- faults ---------------------------------------------------------------------------------------
def test_outage_is_503_for_sends_and_look_ups(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, outage=True)
    response = sms(sandbox, "m-outage.1")
    assert response.status_code == 503 and response.json()["title"] == "Service Unavailable"
    assert records(sandbox, **window()).status_code == 503
    [entry] = logged(sandbox, message_id="m-outage")
    assert (entry["accepted"], entry["fault"], entry["status_code"]) == (False, "outage", 503)


def test_error_rate_is_status_5_and_rate_429_carries_retry_after(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, error_rate=1.0)
    assert sms(sandbox, "m-err.1").json()["messages"] == [{"status": "5", "error-text": "Internal Error"}]
    set_faults(sandbox, error_rate=0, rate_429=1.0)
    limited = sms(sandbox, "m-429.1")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "1")
    assert [(e["fault"], e["accepted"]) for e in logged(sandbox, provider="vonage")] == [
        ("error", False),
        ("rate_429", False),
    ]


def test_latency_applies(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, latency_ms=300)
    started = time.monotonic()
    assert sms(sandbox, "m-slow.1").json()["messages"][0]["status"] == "0"
    assert time.monotonic() - started >= 0.3


def test_timeout_is_accepted_but_unanswered(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, timeout_rate=1.0, timeout_hold_ms=2000)
    with pytest.raises(requests.exceptions.Timeout):
        sms(sandbox, "m-timeout.1", timeout=0.3)
    [entry] = logged(sandbox, message_id="m-timeout")
    assert (entry["accepted"], entry["fault"], entry["status_code"]) == (True, "timeout", 200)
    [row] = records(sandbox, id=entry["provider_message_id"]).json()["records"]
    assert row["client_ref"] == "m-timeout.1"


def test_drop_sends_only_the_intermediate_receipt_and_the_record_stays_accepted(
    sandbox: BackgroundSandbox, receiver: Receiver
) -> None:
    set_faults(sandbox, drop_rate=1.0, receipt_delay_ms=50)
    dropped = sms(sandbox, "m-drop.1", receiver=receiver).json()["messages"][0]["message-id"]
    # A sentinel sent afterwards with the same delay: once its receipts are in, the dropped one's
    # would have been too, so no fixed sleep is needed.
    set_faults(sandbox, drop_rate=0)
    sms(sandbox, "m-drop-sentinel.1", receiver=receiver)
    wait_for(lambda: len(receiver.calls_for("m-drop-sentinel.1")) == 2)
    assert dlr_statuses(receiver.calls_for("m-drop.1")) == ["accepted"]
    [row] = records(sandbox, id=dropped).json()["records"]
    assert (row["status"], row["date_finalized"]) == ("accepted", None)
    assert logged(sandbox, message_id="m-drop")[0]["fault"] == "drop"


def test_receipt_loss_loses_the_final_receipt_but_is_delivered(sandbox: BackgroundSandbox, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_loss_rate=1.0, receipt_delay_ms=50)
    lost = sms(sandbox, "m-lost.1", receiver=receiver).json()["messages"][0]["message-id"]
    set_faults(sandbox, receipt_loss_rate=0)
    sms(sandbox, "m-lost-sentinel.1", receiver=receiver)
    wait_for(lambda: len(receiver.calls_for("m-lost-sentinel.1")) == 2)
    assert dlr_statuses(receiver.calls_for("m-lost.1")) == ["accepted"]
    [row] = records(sandbox, id=lost).json()["records"]
    assert (row["status"], row["error_code"]) == ("delivered", "0")


# --- signed delivery receipts ------------------------------------------------------------------------
def dlr_statuses(calls: list[dict[str, Any]]) -> list[str]:
    return [call["params"]["status"] for call in calls]


def signed(params: dict[str, str], secret: str = SIGNATURE_SECRET) -> bool:
    """Verified by the official SDK, independently of the sandbox's own signer."""
    return Auth(api_key=API_KEY, signature_secret=secret, signature_method="sha256").check_signature(dict(params))


def summary(sandbox: BackgroundSandbox) -> dict[str, Any]:
    return requests.get(f"{sandbox.url}/_sandbox/callbacks/summary", timeout=5).json()


def settled(sandbox: BackgroundSandbox) -> dict[str, int]:
    counts = wait_for(lambda: (found := summary(sandbox))["total"]["pending"] == 0 and found)["vonage"]
    assert counts["scheduled"] == counts["posted_ok"] + counts["given_up"]
    assert counts["attempts"] == counts["posted_ok"] + counts["failed_attempts"]
    return counts


def test_an_intermediate_then_a_final_receipt_each_a_signed_form_post(
    sandbox: BackgroundSandbox, receiver: Receiver
) -> None:
    set_faults(sandbox, receipt_delay_ms=50)
    sent = sms(sandbox, "m-dlr.2", receiver=receiver).json()["messages"][0]
    calls = wait_for(lambda: len(receiver.calls_for("m-dlr.2")) == 2 and receiver.calls_for("m-dlr.2"))
    assert dlr_statuses(calls) == ["accepted", "delivered"] and calls[0]["at"] <= calls[1]["at"]
    for call in calls:
        params = call["params"]
        assert call["path"] == "/webhooks/vonage/"
        assert call["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
        assert set(params) == {
            "msisdn",
            "to",
            "network-code",
            "messageId",
            "price",
            "status",
            "scts",
            "err-code",
            "api-key",
            "client-ref",
            "message-timestamp",
            "timestamp",
            "nonce",
            "sig",
        }
        assert (params["messageId"], params["msisdn"], params["to"]) == (sent["message-id"], RECIPIENT, "Conductor")
        assert (params["err-code"], params["api-key"]) == ("0", API_KEY)
        assert abs(int(params["timestamp"]) - time.time()) < 60
        assert signed(params) and not signed(params, secret="wrong")
    assert calls[0]["params"]["nonce"] != calls[1]["params"]["nonce"]
    assert settled(sandbox) == {
        "scheduled": 2,
        "posted_ok": 2,
        "attempts": 2,
        "failed_attempts": 0,
        "given_up": 0,
        "pending": 0,
    }
    logged_callbacks = requests.get(f"{sandbox.url}/_sandbox/callbacks", timeout=5).json()["callbacks"]
    assert [(c["provider"], c["status"], c["ok"]) for c in logged_callbacks] == [
        ("vonage", "accepted", True),
        ("vonage", "delivered", True),
    ]


def test_final_only_posts_the_final_receipt_alone(sandbox: BackgroundSandbox, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, callback_mode="final_only")
    sms(sandbox, "m-final-only.1", receiver=receiver)
    sms(sandbox, "m-final-only-sentinel.1", receiver=receiver)
    wait_for(lambda: receiver.calls_for("m-final-only-sentinel.1"))
    [call] = receiver.calls_for("m-final-only.1")
    assert call["params"]["status"] == "delivered" and signed(call["params"])


@pytest.mark.parametrize(
    ("receipt_status", "sequence", "err_code"),
    [("undelivered", ["accepted", "failed"], "12"), ("failed", ["rejected"], "9")],
)
def test_unsuccessful_receipts_carry_vonage_statuses(
    sandbox: BackgroundSandbox, receiver: Receiver, receipt_status: str, sequence: list[str], err_code: str
) -> None:
    set_faults(sandbox, receipt_delay_ms=0, receipt_status=receipt_status)
    token = f"m-{receipt_status}.1"
    message_id = sms(sandbox, token, receiver=receiver).json()["messages"][0]["message-id"]
    calls = wait_for(lambda: len(receiver.calls_for(token)) == len(sequence) and receiver.calls_for(token))
    assert dlr_statuses(calls) == sequence and calls[-1]["params"]["err-code"] == err_code
    [row] = records(sandbox, id=message_id).json()["records"]
    assert (row["status"], row["error_code"]) == (sequence[-1], err_code)


def test_a_5xx_is_retried_on_the_scaled_backoff_with_the_same_signed_receipt(
    sandbox: BackgroundSandbox, receiver: Receiver
) -> None:
    # Vonage waits 5 s, then 10 s, 20 s ...; at a scale of 0.02 that is 0.1 s, 0.2 s.
    # `accepted` falls due at 0.75 s and `delivered` at 1.5 s, after the retries.
    set_faults(sandbox, receipt_delay_ms=1500, callback_retry_scale=0.02)
    with receiver.lock:
        receiver.answers = [500, 503]
    sms(sandbox, "m-5xx.1", receiver=receiver)
    calls = wait_for(lambda: len(receiver.calls_for("m-5xx.1")) == 4 and receiver.calls_for("m-5xx.1"))
    assert dlr_statuses(calls) == ["accepted", "accepted", "accepted", "delivered"]
    assert [call["status"] for call in calls] == [500, 503, 200, 200]
    assert calls[1]["at"] - calls[0]["at"] >= 0.1 * 0.9 and calls[2]["at"] - calls[1]["at"] >= 0.2 * 0.9
    assert len({call["params"]["nonce"] for call in calls[:3]}) == 1 and all(signed(c["params"]) for c in calls)
    counts = settled(sandbox)
    assert (counts["posted_ok"], counts["failed_attempts"], counts["given_up"]) == (2, 2, 0)


def test_a_receiver_that_is_down_for_a_while_gets_every_receipt(sandbox: BackgroundSandbox) -> None:
    # Nothing listens on the port until 0.6 s after the send; the backoff (0.05, 0.1, 0.2, 0.4 s
    # at the default scale of 0.01) brings both receipts once it is up.
    port = free_port()
    set_faults(sandbox, receipt_delay_ms=0)
    sms(sandbox, "m-down.1", callback=f"http://127.0.0.1:{port}/webhooks/vonage/")
    wait_for(lambda: summary(sandbox)["vonage"]["failed_attempts"] >= 2)
    time.sleep(0.6)  # the outage itself
    with Receiver(port=port) as late:
        calls = wait_for(lambda: len(late.calls_for("m-down.1")) == 2 and late.calls_for("m-down.1"), timeout=10)
        counts = settled(sandbox)
    assert sorted(dlr_statuses(calls)) == ["accepted", "delivered"]
    assert (counts["posted_ok"], counts["given_up"]) == (2, 0) and counts["failed_attempts"] >= 2


def test_another_4xx_is_not_retried(sandbox: BackgroundSandbox, receiver: Receiver) -> None:
    set_faults(sandbox, receipt_delay_ms=0, receipt_status="failed")  # a single `rejected` receipt
    with receiver.lock:
        receiver.answers = [403]
    sms(sandbox, "m-403.1", receiver=receiver)
    counts = settled(sandbox)
    assert [c["status"] for c in receiver.calls_for("m-403.1")] == [403]
    assert (counts["attempts"], counts["given_up"]) == (1, 1)


def test_md5hash_is_vonages_default_signature_method(receiver: Receiver) -> None:
    with start_background(config("md5hash")) as other:
        set_faults(other, receipt_delay_ms=0)
        sms(other, "m-md5.1", receiver=receiver)
        call = wait_for(lambda: len(receiver.calls_for("m-md5.1")) == 2 and receiver.calls_for("m-md5.1"))[-1]
    params = call["params"]
    # Vonage's recipe: MD5 of "&key=value" for each sorted parameter but sig, then the secret.
    text = "".join(f"&{key}={params[key]}" for key in sorted(params) if key != "sig")
    assert params["sig"] == hashlib.md5((text + SIGNATURE_SECRET).encode()).hexdigest()


# --- GET /v2/reports/records ----------------------------------------------------------------------------
def test_records_by_id_report_ids_not_found(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, receipt_delay_ms=60000)
    sent = sms(sandbox, "m-rec.1").json()["messages"][0]["message-id"]
    missing = str(uuid.uuid4())
    payload = records(sandbox, id=f"{sent},{missing}", include_message="true").json()
    assert (payload["request_status"], payload["items_count"], payload["ids_not_found"]) == ("SUCCESS", 1, missing)
    [row] = payload["records"]
    assert (row["message_id"], row["client_ref"], row["to"], row["from"]) == (sent, "m-rec.1", RECIPIENT, "Conductor")
    assert (row["status"], row["direction"], row["message_body"]) == ("accepted", "outbound", "body of m-rec.1")
    assert "message_body" not in records(sandbox, id=sent).json()["records"][0]


def test_records_by_date_window_and_status(sandbox: BackgroundSandbox) -> None:
    set_faults(sandbox, receipt_delay_ms=0)
    sent = [sms(sandbox, f"m-win.{i}").json()["messages"][0]["message-id"] for i in range(3)]
    listed = records(sandbox, **window()).json()
    assert [r["message_id"] for r in listed["records"]] == sent
    assert records(sandbox, **window(), status="delivered").json()["items_count"] == 3
    assert records(sandbox, **window(), status="failed").json()["items_count"] == 0
    assert records(sandbox, **window(), direction="inbound").json()["records"] == []
    past = {"date_start": "2020-01-01T00:00:00Z", "date_end": "2020-01-01T12:00:00Z"}
    assert records(sandbox, **past).json()["records"] == []


def test_records_page_with_cursor_and_iv(sandbox: BackgroundSandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vonage_api, "RECORDS_PAGE_SIZE", 2)
    sent = [sms(sandbox, f"m-page.{i}").json()["messages"][0]["message-id"] for i in range(5)]
    seen: list[str] = []
    query = window()
    for _ in range(5):
        page = records(sandbox, **query).json()
        seen += [r["message_id"] for r in page["records"]]
        if page["request_status"] != "TRUNCATED":
            break
        next_query = parse_qs(urlsplit(page["_links"]["next"]["href"]).query)
        query |= {"cursor": next_query["cursor"][0], "iv": next_query["iv"][0]}
    assert seen == sent


@pytest.mark.parametrize(
    ("auth", "query", "status", "field"),
    [
        ((API_KEY, "wrong"), {}, 401, None),
        ((API_KEY, API_SECRET), {"account_id": "other123"}, 403, None),
        ((API_KEY, API_SECRET), {"direction": ""}, 422, "direction"),
        ((API_KEY, API_SECRET), {"product": "VOICE-CALL"}, 422, "product"),
        ((API_KEY, API_SECRET), {"date_start": "2025-01-01T00:00:00Z"}, 422, "date_end"),
        (
            (API_KEY, API_SECRET),
            {"date_start": "2025-01-01T00:00:00Z", "date_end": "2025-01-03T00:00:00Z"},
            422,
            "date_end",
        ),
        ((API_KEY, API_SECRET), {"id": "x", "date_start": "2025-01-01T00:00:00Z"}, 422, "id"),
        ((API_KEY, API_SECRET), {"date_start": "yesterday", "date_end": "2025-01-03T00:00:00Z"}, 422, "date_start"),
        ((API_KEY, API_SECRET), {"cursor": "bm9wZQ==", **window()}, 422, "cursor"),
    ],
)
def test_records_refusals(
    sandbox: BackgroundSandbox, auth: tuple[str, str], query: dict[str, str], status: int, field: str | None
) -> None:
    response = records(sandbox, auth=auth, **query)
    assert response.status_code == status, response.text
    if field:
        assert response.json()["invalid_parameters"][0]["name"] == field


# --- ttl (docs/deadlines.md) --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_ttl_that_runs_out_before_delivery_ends_expired_when_it_ends(
    sandbox: BackgroundSandbox, receiver: Receiver
) -> None:
    # Vonage's shortest ttl is 20 s: this test waits that long, for the DLR at the moment it ends.
    set_faults(sandbox, receipt_delay_ms=60_000)
    started = time.monotonic()
    message_id = sms(sandbox, "m-ttl.1", receiver=receiver, ttl="20000").json()["messages"][0]["message-id"]
    [entry] = logged(sandbox, message_id="m-ttl")
    assert entry["ttl"] == "20000"
    calls = wait_for(lambda: len(receiver.calls_for("m-ttl.1")) == 2 and receiver.calls_for("m-ttl.1"), timeout=25)
    assert 19.5 <= time.monotonic() - started < 24
    assert dlr_statuses(calls) == ["accepted", "expired"] and calls[-1]["params"]["err-code"] == "1"
    assert all(signed(call["params"]) for call in calls)
    [row] = records(sandbox, id=message_id).json()["records"]
    assert (row["status"], row["error_code"]) == ("expired", "1")


@pytest.mark.parametrize("ttl", ["19999", "604800001", "soon"])
def test_a_ttl_out_of_range_is_refused(sandbox: BackgroundSandbox, ttl: str) -> None:
    [message] = sms(sandbox, "m-bad-ttl.1", ttl=ttl).json()["messages"]
    assert message["status"] == "3"
