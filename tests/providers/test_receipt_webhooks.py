"""Every adapter's receipt webhook under forged and malformed input, through the webhook views:
a bad signature is 403 (anymail's own view: 400), anything unreadable 400, never a 500, and
nothing is stored; what is stored keeps no signature. Ends with a seeded fuzz of each adapter."""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlencode

import pytest
from django.test import Client

from messaging.models import Message, Receipt
from messaging.receipts import receipts_apply_batch
from providers.conf import providers_setting
from tests.support.signed_receipts import (
    MAILGUN_PROVIDER_PATH,
    MAILGUN_TRACKING_PATH,
    VONAGE_PATH,
    mailgun_body,
    mailgun_event,
    twilio_callback,
    vonage_dlr,
    vonage_signed,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def client() -> Client:
    return Client(raise_request_exception=False)  # a 500 is an answer to assert on


@pytest.fixture
def sms(make_message):
    return lambda provider: make_message(state="dispatched", provider=provider, provider_message_id=f"{provider}-1")


def post_vonage(client: Client, params: dict[str, Any], kind: str = "form"):
    if kind == "json":
        return client.post(VONAGE_PATH, data=json.dumps(params), content_type="application/json")
    if kind == "get":
        return client.get(VONAGE_PATH + "?" + urlencode(params))
    return client.post(VONAGE_PATH, data=params)


def post_twilio(client: Client, callback: tuple[str, dict[str, str], dict[str, str]]):
    path, params, headers = callback
    return client.post(path, data=params, headers=headers)


# --- Vonage ---------------------------------------------------------------------------------------
def test_a_vonage_receipt_is_stored_without_its_sig(client, sms):
    message = sms("vonage")
    params = vonage_signed(vonage_dlr(message_id=str(message.pk), provider_message_id=message.provider_message_id))
    assert post_vonage(client, params).status_code == 204
    receipts_apply_batch()
    [receipt] = Receipt.objects.all()
    assert receipt.message_id == message.pk and receipt.applied
    assert "sig" not in receipt.payload and receipt.payload["nonce"] == params["nonce"]


@pytest.mark.parametrize("kind", ["form", "json", "get"])
@pytest.mark.parametrize("sig", ["é" * 64, "ä", "\u2603" + "0" * 63], ids=["accents", "short", "snowman"])
def test_a_non_ascii_vonage_sig_is_a_bad_signature(client, kind, sig):
    # hmac.compare_digest raises TypeError for non-ASCII text: it must never get there.
    response = post_vonage(client, {**vonage_dlr(), "sig": sig}, kind)
    assert response.status_code == 403
    assert not Receipt.objects.exists()


@pytest.mark.parametrize("sig", [["0" * 64], 42, {"sig": "x"}, None, True, ""], ids=repr)
def test_a_vonage_sig_that_is_not_text_is_a_bad_signature(client, sig):
    assert post_vonage(client, {**vonage_dlr(), "sig": sig}, "json").status_code == 403


@pytest.mark.parametrize("body", [b"[]", b'"delivered"', b"42", b"null", b"{not json", b"\xff\xfe"])
def test_a_vonage_json_body_that_is_not_an_object_is_400(client, body):
    response = client.post(VONAGE_PATH, data=body, content_type="application/json")
    assert response.status_code == 400
    assert not Receipt.objects.exists()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"messageId": 12345}, "not text"),
        ({"messageId": ["a", "b"]}, "not text"),
        ({"status": ["delivered"]}, "not text"),
        ({"client-ref": 7}, "client-ref"),
        ({"client-ref": "not-ours.1"}, "message_id"),
        ({"client-ref": "0b7c1d2e.1"}, "message_id"),
        ({"err-code": ["1"]}, "err-code"),
        ({"err-code": "9" * 65}, "error_code"),
        ({"messageId": "m" * 129}, "provider_message_id"),
        ({"status": "s" * 65}, "provider_status"),
    ],
)
@pytest.mark.parametrize("kind", ["json", "form"])
def test_a_signed_vonage_receipt_with_odd_fields_is_400_naming_them(client, overrides, field, kind):
    if kind == "form" and any(not isinstance(value, str) for value in overrides.values()):
        pytest.skip("a form carries text only")
    response = post_vonage(client, vonage_signed(vonage_dlr(**overrides)), kind)
    assert response.status_code == 400, response.content
    assert field in response.json()["detail"]
    assert not Receipt.objects.exists()


# --- Twilio ---------------------------------------------------------------------------------------
def public_url() -> str:
    return providers_setting("PUBLIC_URL")


def test_a_twilio_callback_is_stored_as_posted(client, sms):
    message = sms("twilio")
    callback = twilio_callback(public_url(), message_id=str(message.pk), sid=message.provider_message_id)
    assert post_twilio(client, callback).status_code == 204
    receipts_apply_batch()
    [receipt] = Receipt.objects.all()
    # The signature is a header, never in the payload; the form holds nothing secret.
    assert receipt.payload == callback[1] and receipt.applied


@pytest.mark.parametrize(
    "signature", ["", "forged", "é" * 28, "\u2603"], ids=["missing", "forged", "non-ascii", "snowman"]
)
def test_a_twilio_callback_without_our_signature_is_403(client, sms, signature):
    path, params, _ = twilio_callback(public_url(), sid=sms("twilio").provider_message_id)
    headers = {"X-Twilio-Signature": signature} if signature else {}
    assert client.post(path, data=params, headers=headers).status_code == 403
    assert not Receipt.objects.exists()


def test_a_twilio_callback_signed_with_another_token_is_403(client):
    assert post_twilio(client, twilio_callback(public_url(), auth_token="another")).status_code == 403


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"message_id": "m-1"}, "message_id"),
        ({"message_id": "0" * 300}, "message_id"),
        ({"sid": "SM" + "0" * 127}, "provider_message_id"),
        ({"status": "s" * 65}, "provider_status"),
        ({"ErrorCode": "3" * 65}, "error_code"),
        ({"sid": "SM\x00"}, "provider_message_id"),
        ({"sid": ""}, "MessageSid"),
    ],
)
def test_a_signed_twilio_callback_with_odd_fields_is_400_naming_them(client, kwargs, field):
    response = post_twilio(client, twilio_callback(public_url(), **kwargs))
    assert response.status_code == 400, response.content
    assert field in response.json()["detail"]
    assert not Receipt.objects.exists()


def test_a_twilio_body_that_is_not_a_form_is_refused(client):
    response = client.post("/webhooks/twilio/", data=b"\xff\x00{", content_type="application/x-www-form-urlencoded")
    assert response.status_code == 403


# --- a seeded fuzz of each adapter: any answer but a 500, and nothing stored unless it was taken --
ODD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    2**70,
    1e308,
    float("nan"),
    "",
    " ",
    "x" * 300,
    "\x00",
    "\ud800",
    "é",
    "😀",
    "a&b=c",
    "..",
    "<>",
    [],
    [1, "a"],
    {},
    {"a": {"b": []}},
    str(uuid.uuid4()),
    f"{uuid.uuid4()}.1",
]
ODD_TEXT = [value for value in ODD_VALUES if isinstance(value, str) and value not in ("\ud800",)]
FUZZ_ROUNDS = 150


def fuzzed(rng: random.Random, base: dict[str, Any], values: list[Any], extra_keys: list[str]) -> dict[str, Any]:
    """base with a few fields given odd values, dropped, or added."""
    result = dict(base)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice([*base, *extra_keys])
        if rng.random() < 0.15:
            result.pop(key, None)
        else:
            result[key] = rng.choice(values)
    return result


def assert_answered(response, taken: set[int], seen: Counter) -> None:
    assert response.status_code != 500, response.content
    assert response.status_code in taken | {400, 403}, (response.status_code, response.content)
    seen[response.status_code] += 1


def test_fuzz_vonage(client):
    rng, seen = random.Random(1), Counter()
    for _ in range(FUZZ_ROUNDS):
        stored = Receipt.objects.count()
        kind = rng.choice(["json", "json", "form", "get"])
        values = ODD_VALUES if kind == "json" else ODD_TEXT
        params = fuzzed(rng, vonage_dlr(), values, ["sig", "extra"])
        if rng.random() < 0.85:
            try:
                params = vonage_signed(params)
            except UnicodeEncodeError:
                pass  # a lone surrogate cannot be signed: posted unsigned
        response = post_vonage(client, json.loads(json.dumps(params)) if kind == "json" else params, kind)
        assert_answered(response, {204}, seen)
        if response.status_code != 204:
            assert Receipt.objects.count() == stored
    assert {204, 400, 403} <= set(seen), seen  # the fuzz reached parse() and got past it


def test_fuzz_twilio(client):
    rng, seen = random.Random(2), Counter()
    for _ in range(FUZZ_ROUNDS):
        fields = fuzzed(rng, {"ErrorCode": "30003", "SmsStatus": "sent", "SmsSid": "SM1"}, ODD_TEXT, ["Body"])
        status = rng.choice(["delivered", "read", "", "x" * 70, "\x00", "é"])
        sid = rng.choice(["SM1", "", "x" * 200, "é", "a:b"])
        message_id = rng.choice([None, "m-1", "", str(uuid.uuid4())])
        callback = twilio_callback(public_url(), message_id=message_id, sid=sid, status=status, **fields)
        assert_answered(post_twilio(client, callback), {204}, seen)
    assert {204, 400} <= set(seen), seen


def test_fuzz_mailgun(client):
    rng, seen = random.Random(3), Counter()
    event_keys = ["event", "id", "timestamp", "message", "user-variables", "severity", "reason", "recipient"]
    event_keys += ["delivery-status", "reject", "client-info", "url", "tags"]
    for _ in range(FUZZ_ROUNDS):
        event_data = fuzzed(rng, mailgun_event(), ODD_VALUES, event_keys)
        if rng.random() < 0.3:
            event_data["message"] = {"headers": {"message-id": rng.choice(ODD_VALUES)}}
        if rng.random() < 0.2:
            event_data["user-variables"] = {"conductor_message_id": rng.choice(ODD_VALUES)}
        body: Any = mailgun_body(json.loads(json.dumps(event_data)))
        if rng.random() < 0.1:
            body["signature"] = fuzzed(rng, body["signature"], ODD_VALUES, [])
        if rng.random() < 0.05:
            body = rng.choice([[body], "body", None])
        path = rng.choice([MAILGUN_TRACKING_PATH, MAILGUN_PROVIDER_PATH])
        response = client.post(path, data=json.dumps(body), content_type="application/json")
        assert_answered(response, {200, 204}, seen)
    assert {400, 403} <= set(seen) and seen[200] + seen[204] > 0, seen


def test_fuzzed_receipts_that_were_taken_are_stored_whole(client):
    # Whatever passed the fuzz above is storable: stored receipts round-trip through PostgreSQL.
    rng = random.Random(4)
    for _ in range(40):
        event_data = fuzzed(rng, mailgun_event(), ODD_VALUES, ["tags", "url", "recipient", "campaigns"])
        client.post(MAILGUN_TRACKING_PATH, data=json.dumps(mailgun_body(event_data)), content_type="application/json")
    for receipt in Receipt.objects.all():
        assert "signature" not in receipt.payload
    assert Message.objects.count() == 0
