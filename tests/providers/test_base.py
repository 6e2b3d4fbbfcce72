"""The provider base: it runs the send flow and the webhook flow once; adapters supply hooks."""

from __future__ import annotations

import asyncio

import pytest
import requests

from providers.base import REQUIRED, Provider
from providers.types import (
    INBOUND_FIELD_MAX_LENGTHS,
    AmbiguousProviderError,
    ErrorType,
    InboundMessage,
    InboundNotSupported,
    PermanentProviderError,
    SendResult,
    TransientProviderError,
    WebhookSignatureError,
)


class Echo(Provider):
    """A provider whose call is a function the test supplies."""

    name = "echo"
    channels = frozenset({"sms"})
    status_map = {"sent": "dispatched"}
    unreadable_errors = (KeyError,)
    own_settings = {"API_KEY": REQUIRED, "REGION": "eu"}

    def __init__(self, config, call=None):
        super().__init__(config)
        self.call = call
        self.seen: list[str] = []

    def prepare(self, request):
        return request

    def transmit(self, prepared):
        return self.call()

    def verify(self, request):
        self.seen.append("verify")
        if request != "signed":
            raise WebhookSignatureError("unsigned")

    def parse(self, request):
        self.seen.append("parse")
        return []

    def fetch_status(self, provider_message_id):
        raise NotImplementedError

    def find_send(self, request):
        raise NotImplementedError


def fail_with(exc):
    def call():
        raise exc

    return call


def test_send_sorts_failures_and_passes_provider_errors_and_bugs_through():
    sent = SendResult("p-1", "sent")
    assert Echo({}, call=lambda: sent).send("request") is sent
    with pytest.raises(TransientProviderError) as caught:
        Echo({}, call=fail_with(requests.exceptions.ConnectTimeout("no"))).send("request")
    assert isinstance(caught.value.__cause__, requests.exceptions.ConnectTimeout)
    with pytest.raises(AmbiguousProviderError):
        Echo({}, call=fail_with(KeyError("sid"))).send("request")  # an unreadable answer
    permanent = PermanentProviderError("no", error_type=ErrorType.REJECTED)
    with pytest.raises(PermanentProviderError) as caught:
        Echo({}, call=fail_with(permanent)).send("request")
    assert caught.value is permanent and caught.value.__cause__ is None
    with pytest.raises(ZeroDivisionError):
        Echo({}, call=fail_with(ZeroDivisionError())).send("request")


def test_send_async_without_an_async_client_runs_send_in_the_thread_pool():
    sent = SendResult("p-1", "sent")
    assert asyncio.run(Echo({}, call=lambda: sent).send_async("request")) is sent
    with pytest.raises(AmbiguousProviderError):
        asyncio.run(Echo({}, call=fail_with(requests.exceptions.ReadTimeout())).send_async("request"))


def test_the_webhook_is_verified_before_it_is_parsed_and_never_parsed_if_forged():
    provider = Echo({})
    assert provider.parse_webhook("signed") == [] and provider.seen == ["verify", "parse"]
    provider.seen.clear()
    with pytest.raises(WebhookSignatureError):
        provider.parse_webhook("forged")
    assert provider.seen == ["verify"]


def test_an_inbound_webhook_is_verified_before_it_is_parsed_and_refused_by_a_provider_without_one():
    assert not Echo.replies_in_answer
    provider = Echo({})
    with pytest.raises(InboundNotSupported, match="echo"):
        provider.parse_inbound_webhook("signed")
    assert provider.seen == []  # refused before anything is read

    class Talkative(Echo):
        def parse_inbound(self, request):
            self.seen.append("parse_inbound")
            return InboundMessage("echo", "sms", "+14155552671", "+15005550006", "STOP", "id-1")

    talkative = Talkative({})
    assert talkative.parse_inbound_webhook("signed").body == "STOP"
    assert talkative.seen == ["verify", "parse_inbound"]
    talkative.seen.clear()
    with pytest.raises(WebhookSignatureError):
        talkative.parse_inbound_webhook("forged")
    assert talkative.seen == ["verify"]


def test_the_inbound_limits_are_the_inbound_tables_columns():
    from messaging.models import InboundMessage as InboundRecord

    columns = {"provider_message_id": "provider_message_id", "from_": "sender", "to": "to"}
    assert INBOUND_FIELD_MAX_LENGTHS == {
        name: InboundRecord._meta.get_field(column).max_length for name, column in columns.items()
    }


@pytest.mark.parametrize("flow", ["send", "send_async", "parse_webhook", "parse_inbound_webhook"])
def test_an_adapter_cannot_replace_a_flow_the_base_runs(flow):
    with pytest.raises(TypeError, match="overrides a flow"):
        type("Rogue", (Echo,), {flow: lambda self, request: None})


def test_a_missing_hook_fails_loudly():
    class Unfinished(Provider):
        name = "unfinished"
        channels = frozenset({"sms"})
        status_map = {}

    with pytest.raises(TypeError, match="abstract"):
        Unfinished({})


def test_settings_are_read_through_the_declared_schema():
    provider = Echo({"API_KEY": "k", "TIMEOUT_SECONDS": 2.0})
    assert (provider.setting("API_KEY"), provider.setting("REGION"), provider.setting("TIMEOUT_SECONDS")) == (
        "k",
        "eu",
        2.0,
    )
    assert provider.setting("RATE_LIMIT_BURST") == 1  # a shared key's default
    with pytest.raises(KeyError, match="not a setting"):
        provider.setting("REGIONS")
    with pytest.raises(KeyError, match="has no 'API_KEY'"):
        Echo({}).setting("API_KEY")


# --- every receipt a webhook yields is storable as it is ------------------------------------------
def receipt(**fields):
    from providers.types import ReceiptEvent

    values = {
        "provider": "echo",
        "event_id": "SM1:delivered",
        "provider_message_id": "SM1",
        "provider_status": "delivered",
        "state": "delivered",
        "message_id": "0b7c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d",
        "payload": {"MessageStatus": "delivered"},
    }
    return ReceiptEvent(**{**values, **fields})


def test_the_receipt_limits_are_the_receipt_tables_columns():
    from messaging.models import Receipt
    from providers.types import RECEIPT_FIELD_MAX_LENGTHS

    assert RECEIPT_FIELD_MAX_LENGTHS == {
        name: Receipt._meta.get_field(name).max_length for name in RECEIPT_FIELD_MAX_LENGTHS
    }


@pytest.mark.parametrize(
    ("field", "limit"), [("provider_message_id", 128), ("provider_status", 64), ("error_code", 64), ("event_id", 200)]
)
def test_a_field_longer_than_its_column_is_refused_naming_it(field, limit):
    from providers.base import receipt_checked

    assert receipt_checked(receipt(**{field: "x" * limit})).payload == {"MessageStatus": "delivered"}
    with pytest.raises(ValueError, match=f"^{field} is {limit + 1} characters long"):
        receipt_checked(receipt(**{field: "x" * (limit + 1)}))


@pytest.mark.parametrize(
    "fields",
    [
        {"provider_message_id": ["SM1"]},
        {"provider_status": 3},
        {"event_id": None},
        {"error_code": "bad\x00code"},
        {"provider_message_id": "SM\ud800"},
        {"message_id": "m-1"},
        {"message_id": 42},
        {"message_id": ""},
        {"payload": ["not", "an", "object"]},
    ],
)
def test_odd_fields_are_refused_naming_the_field(fields):
    from providers.base import receipt_checked

    [name] = fields
    with pytest.raises(ValueError, match=f"^{name}"):
        receipt_checked(receipt(**fields))


def test_a_payload_is_kept_as_sent_except_what_postgresql_cannot_store():
    from providers.base import receipt_checked

    odd = {"a\x00": "b\x00", "list": ["\ud800x", 1.5, float("nan")], "deep": {"inf": float("-inf"), "ok": "é"}}
    checked = receipt_checked(receipt(payload=odd)).payload
    assert checked == {
        "a\ufffd": "b\ufffd",
        "list": ["\ufffd\ufffd\ufffdx", 1.5, "nan"],
        "deep": {"inf": "-inf", "ok": "é"},
    }
    fine = receipt()
    assert receipt_checked(fine) is fine


def test_the_webhook_flow_checks_every_receipt_it_parses():
    class Long(Echo):
        def parse(self, request):
            return [receipt(provider_message_id="x" * 129)]

    with pytest.raises(ValueError, match="provider_message_id"):
        Long({"API_KEY": "k", "TIMEOUT_SECONDS": 1}).parse_webhook("signed")
