"""Vonage adapter: the shared provider contract, plus Vonage specifics (signatures, DLR map, errors)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import RequestFactory

from providers.conf import provider_config
from providers.registry import get_provider, reset_provider_cache
from providers.sandbox import vonage_api
from providers.sandbox.vonage_api import signature
from providers.types import (
    AmbiguousProviderError,
    PermanentProviderError,
    TransientProviderError,
    WebhookSignatureError,
)
from providers.vonage import VonageProvider
from tests.providers.contract import ProviderContract, send_request
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.timeout(30)
RECIPIENT = "+14155552671"
OURS = "0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d"  # a Conductor message id, as client-ref carries it


def dlr(**overrides: str) -> dict[str, str]:
    """The parameters of a Vonage delivery receipt (unsigned)."""
    params = {
        "msisdn": RECIPIENT.removeprefix("+"),
        "to": "Conductor",
        "network-code": "310260",
        "messageId": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "price": "0.00570000",
        "status": "delivered",
        "scts": "2501011200",
        "err-code": "0",
        "api-key": "sandboxkey",
        "client-ref": f"{OURS}.1",
        "message-timestamp": "2025-01-01 12:00:00",
        "timestamp": str(int(time.time())),
        "nonce": str(uuid.uuid4()),
    }
    params.update(overrides)
    return params


def signed(params: dict[str, str], secret: str, method: str = "sha256") -> dict[str, str]:
    # The sandbox's signer is written from Vonage's documentation; the adapter verifies with the SDK.
    return {**params, "sig": signature(params, secret, method)}


def secret() -> str:
    return provider_config("vonage")["SIGNATURE_SECRET"]


def as_request(params: dict[str, Any], kind: str = "form") -> Any:
    factory = RequestFactory()
    if kind == "json":
        return factory.post("/webhooks/vonage/", data=json.dumps(params), content_type="application/json")
    if kind == "get":
        return factory.get("/webhooks/vonage/?" + urlencode(params))
    return factory.post("/webhooks/vonage/", data=params)


class TestVonageContract(ProviderContract):
    invalid_recipient = "+1234"

    @pytest.fixture
    def provider(self, sandbox):
        return get_provider("vonage")

    @pytest.fixture
    def provider_at(self, sandbox):
        return lambda base_url: VonageProvider({**provider_config("vonage"), "BASE_URL": base_url})

    @pytest.fixture
    def recipient(self):
        return RECIPIENT

    @pytest.fixture
    def signed_webhook(self):
        def build(valid: bool):
            return as_request(signed(dlr(), secret() if valid else "wrong"))

        return build


# --- receipts: signatures and the status map ------------------------------------------------------
@pytest.mark.parametrize("kind", ["form", "json", "get"])
def test_receipt_signature_is_checked_for_every_body_kind(kind: str) -> None:
    provider = get_provider("vonage")
    [event] = provider.parse_webhook(as_request(signed(dlr(), secret()), kind))
    assert (event.provider_message_id, event.provider_status, event.state) == (
        "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
        "delivered",
        "delivered",
    )
    assert event.payload["msisdn"] == "14155552671" and event.error_code == ""

    tampered = {**signed(dlr(), secret()), "status": "failed"}
    unsigned = dlr()
    for params in (tampered, unsigned, signed(dlr(), "wrong")):
        with pytest.raises(WebhookSignatureError):
            provider.parse_webhook(as_request(params, kind))


@pytest.mark.parametrize("method", ["md5hash", "md5", "sha1", "sha256", "sha512"])
def test_every_vonage_signature_method_verifies(method: str) -> None:
    provider = VonageProvider({**provider_config("vonage"), "SIGNATURE_METHOD": method})
    params = dlr(**{"to": "Shop&Co=1"})  # & and = in values are part of Vonage's scheme
    [event] = provider.parse_webhook(as_request(signed(params, secret(), method)))
    assert event.message_id == OURS and event.payload["to"] == "Shop&Co=1"
    other = "sha256" if method != "sha256" else "sha1"
    with pytest.raises(WebhookSignatureError):
        provider.parse_webhook(as_request(signed(params, secret(), other)))


@pytest.mark.parametrize(
    ("status", "state"),
    [
        ("delivered", "delivered"),
        ("accepted", "dispatched"),
        ("buffered", "dispatched"),
        ("expired", "undelivered"),
        ("failed", "undelivered"),
        ("rejected", "failed"),
        ("unknown", None),
    ],
)
def test_dlr_status_map(status: str, state: str | None) -> None:
    [event] = get_provider("vonage").parse_webhook(
        as_request(signed(dlr(status=status, **{"err-code": "6"}), secret()))
    )
    assert (event.provider_status, event.state, event.error_code) == (status, state, "6")
    assert VonageProvider.status_map[status] == state


def test_a_resent_dlr_is_the_same_event_and_attributed_by_client_ref() -> None:
    provider = get_provider("vonage")
    first = provider.parse_webhook(as_request(signed(dlr(**{"client-ref": f"{OURS}.3"}), secret())))[0]
    again = provider.parse_webhook(as_request(signed(dlr(**{"client-ref": f"{OURS}.3"}), secret()), "json"))[0]
    assert first.event_id == again.event_id == "aaaaaaaa-bbbb-cccc-dddd-0123456789ab:delivered"
    assert first.message_id == OURS
    later = provider.parse_webhook(as_request(signed(dlr(status="failed"), secret())))[0]
    assert later.event_id != first.event_id


def test_a_receipt_without_message_id_is_unreadable() -> None:
    params = dlr()
    del params["messageId"]
    with pytest.raises(ValueError):
        get_provider("vonage").parse_webhook(as_request(signed(params, secret())))


# --- sending against the sandbox --------------------------------------------------------------------
def test_client_ref_carries_the_token_and_the_sandbox_attributes_it(sandbox) -> None:
    request = send_request(RECIPIENT, body=f"attributed {uuid.uuid4()}")
    result = get_provider("vonage").send(request)
    [logged] = sandbox.requests(message_id=request.message_id)
    assert (logged["provider"], logged["token"], logged["to"]) == ("vonage", request.token, RECIPIENT)
    assert logged["provider_message_id"] == result.provider_message_id and result.provider_status == "0"


def test_the_sandbox_receipt_verifies_and_names_our_message(sandbox, settings) -> None:
    """End to end: the sandbox signs a DLR to our callback URL, the adapter verifies and attributes it."""
    with Receiver() as receiver:
        settings.CONDUCTOR = {**settings.CONDUCTOR, "PUBLIC_URL": receiver.base}
        reset_provider_cache()
        sandbox.faults("vonage", receipt_delay_ms=0)
        request = send_request(RECIPIENT)
        result = get_provider("vonage").send(request)
        calls = receiver.wait(count=2)  # the intermediate `accepted` DLR, then the final one
    events = []
    for call in calls:
        assert call["path"] == "/webhooks/vonage/"
        events += get_provider("vonage").parse_webhook(RequestFactory().post(call["path"], data=call["params"]))
    assert [(e.message_id, e.provider_message_id, e.provider_status, e.state) for e in events] == [
        (request.message_id, result.provider_message_id, "accepted", "dispatched"),
        (request.message_id, result.provider_message_id, "delivered", "delivered"),
    ]


def test_an_invalid_number_is_permanent_and_not_accepted(sandbox) -> None:
    request = send_request("+12")
    with pytest.raises(PermanentProviderError) as caught:
        get_provider("vonage").send(request)
    assert (caught.value.error_type, caught.value.code) == ("invalid_recipient", "3")
    [logged] = sandbox.requests(message_id=request.message_id)
    assert (logged["accepted"], logged["fault"]) == (False, "invalid")


def test_find_send_matches_the_token_not_the_body(sandbox) -> None:
    provider = get_provider("vonage")
    mine, other = send_request(RECIPIENT, body="same body"), send_request(RECIPIENT, body="same body")
    provider.send(other)
    sent = provider.send(mine)
    since = datetime.now(UTC)
    # The dispatcher passes the time of the generation's first attempt.
    found = provider.find_send(dataclasses.replace(mine, attempted_since=since))
    assert [f.provider_message_id for f in found] == [sent.provider_message_id]


def test_find_send_follows_truncated_pages(sandbox, monkeypatch) -> None:
    monkeypatch.setattr(vonage_api, "RECORDS_PAGE_SIZE", 2)
    provider = get_provider("vonage")
    requests = [send_request(RECIPIENT) for _ in range(5)]
    results = [provider.send(r) for r in requests]
    assert [f.provider_message_id for f in provider.find_send(requests[0])] == [results[0].provider_message_id]
    assert [f.provider_message_id for f in provider.find_send(requests[4])] == [results[4].provider_message_id]


def test_a_dropped_message_stays_dispatched_and_an_unknown_id_is_not_final(sandbox) -> None:
    sandbox.faults("vonage", drop_rate=1.0, receipt_delay_ms=0)
    provider = get_provider("vonage")
    result = provider.send(send_request(RECIPIENT))
    status = provider.fetch_status(result.provider_message_id)
    assert (status.provider_status, status.state) == ("accepted", "dispatched")
    with pytest.raises(TransientProviderError) as caught:
        provider.fetch_status(str(uuid.uuid4()))
    assert caught.value.code == "ids_not_found"


def test_an_outage_of_the_reports_api_is_transient(sandbox) -> None:
    sandbox.faults("vonage", outage=True)
    with pytest.raises(TransientProviderError) as caught:
        get_provider("vonage").find_send(send_request(RECIPIENT))
    assert caught.value.error_type == "provider_5xx"


# --- how each SMS API answer is classified ----------------------------------------------------------
@pytest.mark.parametrize(
    ("http_status", "body", "kind", "error_type", "code"),
    [
        (200, {"status": "1", "error-text": "Throttled"}, TransientProviderError, "rate_limited", "1"),
        (200, {"status": "5", "error-text": "Internal Error"}, TransientProviderError, "provider_5xx", "5"),
        (200, {"status": "4", "error-text": "Bad Credentials"}, TransientProviderError, "provider_auth", "4"),
        (200, {"status": "9", "error-text": "Quota Exceeded"}, TransientProviderError, "provider_auth", "9"),
        (200, {"status": "7", "error-text": "Number Barred"}, PermanentProviderError, "opted_out", "7"),
        (200, {"status": "6", "error-text": "Invalid Message"}, PermanentProviderError, "invalid_recipient", "6"),
        (200, {"status": "33", "error-text": "Number De-activated"}, PermanentProviderError, "invalid_recipient", "33"),
        (200, {"status": "29", "error-text": "Non White-listed"}, PermanentProviderError, "rejected", "29"),
        (200, {"status": "3", "error-text": "Invalid from param"}, PermanentProviderError, "rejected", "3"),
        (200, {"status": "15", "error-text": "Illegal Sender"}, PermanentProviderError, "rejected", "15"),
        (500, {"title": "Internal Server Error"}, TransientProviderError, "provider_5xx", "500"),
        (401, {"title": "Unauthorized"}, TransientProviderError, "provider_auth", "401"),
        (429, {"title": "Too Many Requests"}, TransientProviderError, "rate_limited", "429"),
        (200, "not json", AmbiguousProviderError, "unknown", ""),
    ],
)
def test_sms_api_answers_are_classified(
    canned: Callable[..., str], http_status: int, body: Any, kind: type, error_type: str, code: str
) -> None:
    payload = {"message-count": "1", "messages": [body]} if http_status == 200 and isinstance(body, dict) else body
    provider = VonageProvider({**provider_config("vonage"), "BASE_URL": canned(http_status, payload)})
    with pytest.raises(kind) as caught:
        provider.send(send_request(RECIPIENT))
    assert (caught.value.error_type, caught.value.code) == (error_type, code)
    if http_status == 429:
        assert caught.value.retry_after is None  # no Retry-After header: the backoff decides


def test_a_dropped_connection_after_sending_is_ambiguous_and_not_resent(canned: Callable[..., str]) -> None:
    base = canned(0, None)  # 0: close the connection without answering
    with pytest.raises(AmbiguousProviderError) as caught:
        VonageProvider({**provider_config("vonage"), "BASE_URL": base}).send(send_request(RECIPIENT))
    assert caught.value.error_type == "connection_error"
    assert CannedServer.hits[base] == 1  # the SDK's RemoteDisconnected retry loop did not resend


# --- helpers ---------------------------------------------------------------------------------------
class Receiver(WebhookReceiver):
    """A one-shot webhook endpoint standing in for our web process."""

    def __init__(self) -> None:
        super().__init__(default_status=204)

    def wait(self, count: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.calls) >= count:
                    return list(self.calls)
            time.sleep(0.02)
        raise AssertionError(f"fewer than {count} receipts arrived")


class CannedServer:
    """Answers every request with one fixed HTTP status and body (or drops the connection for 0)."""

    hits: dict[str, int] = {}

    def __init__(self, status: int, body: Any) -> None:
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                CannedServer.hits[canned.base] += 1
                if status == 0:
                    self.close_connection = True
                    return
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        CannedServer.hits[self.base] = 0
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()


@pytest.fixture
def canned() -> Iterator[Callable[..., str]]:
    servers: list[CannedServer] = []

    def start(status: int, body: Any) -> str:
        servers.append(CannedServer(status, body))
        return servers[-1].base

    yield start
    for server in servers:
        server.server.shutdown()
        server.server.server_close()


def test_a_barred_number_is_opted_out_and_not_accepted(sandbox) -> None:
    """Status 7 (Number Barred, where a STOP puts a number) from the sandbox's SMS API."""
    sandbox.faults("vonage", opted_out=[RECIPIENT])
    request = send_request(RECIPIENT)
    with pytest.raises(PermanentProviderError) as caught:
        get_provider("vonage").send(request)
    assert (caught.value.error_type, caught.value.code) == ("opted_out", "7")
    [logged] = sandbox.requests(message_id=request.message_id)
    assert (logged["accepted"], logged["fault"]) == (False, "opted_out")
    assert get_provider("vonage").send(send_request("+14155552673")).provider_message_id  # others go out
