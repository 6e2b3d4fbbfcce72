"""Forged, replayed and malformed receipts over real HTTP against the running stack, posted to
either receiver of receipts (gunicorn with two processes, and the receipt intake server), its own
Redis: refused with 403 (a bad or reused signature; anymail's own view
answers a bad signature with 400), 400 (unreadable), 503 (Redis down), never a 500; none of them
changes anything; and what is stored or shown of a receipt carries no signature material."""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import pytest
import requests

from messaging.models import Message, Receipt
from tests.integration.test_dispatch_flow import wait_for_all
from tests.support.processes import PYTHON, ManagedProcess, free_port, http_ok, wait_until
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

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

RECEIPT_FIELDS = {
    "received_at",
    "provider",
    "provider_message_id",
    "provider_status",
    "mapped_state",
    "error_code",
    "applied",
    "source",
}


@pytest.fixture
def key(live, client_key) -> str:
    return client_key[1]


@pytest.fixture(params=["web", "intake"])
def receiver(request, live) -> str:
    """Where the receipt is posted: the web (gunicorn, Django's view) or the receipt intake server
    (asyncio, at CONDUCTOR_RECEIPTS_URL); both must answer and store alike."""
    return live.web_url if request.param == "web" else live.receipts_url


@pytest.fixture
def dispatched(live, make_message):
    """A message of the client `key` belongs to, already dispatched to `provider` (a row written
    directly, so no worker sends it and no receipt but the test's arrives)."""

    def make(provider: str, channel: str = "sms") -> Message:
        to = "ada@example.com" if channel == "email" else "+14155552671"
        # The provider's id of it, as its receipts carry it (Mailgun: the Message-Id, in <>).
        reference = (
            f"<{uuid.uuid4().hex}@mg.example.com>" if provider == "mailgun" else f"{provider}-{uuid.uuid4().hex}"
        )
        return make_message(
            channel=channel, to=to, state="dispatched", provider=provider, provider_message_id=reference
        )

    return make


def mailgun_event_for(message: Message, **data) -> dict:
    """Mailgun's event-data for `message`: our id in its variables, Mailgun's in its headers."""
    headers = {"message-id": message.provider_message_id.strip("<>")}
    return mailgun_event(message_id=str(message.pk), **{"message": {"headers": headers}, **data})


def applied(message: Message, state: str = "delivered") -> None:
    """Wait until the stored receipt is applied (the receipts worker, off the request path)."""
    wait_until(lambda: Message.objects.get(pk=message.pk).state == state, 30, what=f"{message.provider} {state}")


def post_json(url: str, body) -> requests.Response:
    return requests.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=10)


def detail(live, key: str, message: Message) -> dict:
    response = live.api(key).get(f"{live.web_url}/api/v1/messages/{message.pk}/", timeout=10)
    assert response.status_code == 200
    return response.json()


def assert_no_signature_material(live, key: str, message: Message, secrets: list[str]) -> None:
    """Neither the stored receipts nor the API's view of them holds any of `secrets`."""
    stored = json.dumps([receipt.payload for receipt in Receipt.objects.filter(message=message)])
    shown = detail(live, key, message)
    for secret in secrets:
        assert secret not in stored and secret not in json.dumps(shown), secret
    assert shown["receipts"] and all(set(receipt) == RECEIPT_FIELDS for receipt in shown["receipts"])


# --- what is stored and shown ---------------------------------------------------------------------
def test_a_real_email_through_the_sandbox_is_delivered_and_keeps_no_signature(live, key):
    # The sandbox signs Mailgun's webhooks as Mailgun does: they pass the replay checks.
    response = live.api(key).post(
        f"{live.web_url}/api/v1/messages/",
        json={"channel": "email", "to": "ada@example.com", "subject": "Invoice", "body": "Attached."},
        timeout=10,
    )
    assert response.status_code == 201, response.text
    message_id = response.json()["id"]
    wait_for_all([message_id], {"delivered"}, timeout=30)
    message = Message.objects.get(pk=message_id)
    # Mailgun posts `accepted`, then `delivered` (docs/sandbox.md): each stored without its signature.
    wait_until(lambda: Receipt.objects.filter(message=message).count() == 2, 30, what="both Mailgun webhooks")
    receipts = Receipt.objects.filter(message=message).order_by("id")
    assert [r.payload["event-data"]["event"] for r in receipts] == ["accepted", "delivered"]
    assert all("signature" not in receipt.payload for receipt in receipts)
    shown = {receipt["provider_status"]: receipt for receipt in detail(live, key, message)["receipts"]}
    assert all(set(receipt) == RECEIPT_FIELDS and receipt["provider"] == "mailgun" for receipt in shown.values())
    assert shown["delivered"]["applied"]


def test_signed_receipts_of_each_provider_keep_and_show_no_signature(live, receiver, key, dispatched):
    twilio, vonage, mailgun = dispatched("twilio"), dispatched("vonage"), dispatched("mailgun", "email")

    path, form, headers = twilio_callback(receiver, message_id=str(twilio.pk), sid=twilio.provider_message_id)
    assert requests.post(receiver + path, data=form, headers=headers, timeout=10).status_code == 204

    params = vonage_signed(vonage_dlr(message_id=str(vonage.pk), provider_message_id=vonage.provider_message_id))
    assert requests.post(receiver + VONAGE_PATH, data=params, timeout=10).status_code == 204

    body = mailgun_body(mailgun_event_for(mailgun))
    assert post_json(receiver + MAILGUN_TRACKING_PATH, body).status_code == 200

    for message in (twilio, vonage, mailgun):
        applied(message)
    assert_no_signature_material(live, key, twilio, [headers["X-Twilio-Signature"]])
    assert_no_signature_material(live, key, vonage, [params["sig"]])
    assert_no_signature_material(live, key, mailgun, [body["signature"]["signature"], body["signature"]["token"]])


# --- forged signatures ----------------------------------------------------------------------------
def test_a_forged_twilio_callback_is_403_and_changes_nothing(live, receiver, dispatched):
    message = dispatched("twilio")
    path, form, headers = twilio_callback(
        receiver, message_id=str(message.pk), sid=message.provider_message_id, auth_token="not-ours"
    )
    assert requests.post(receiver + path, data=form, headers=headers, timeout=10).status_code == 403
    assert requests.post(receiver + path, data=form, timeout=10).status_code == 403  # unsigned
    # Signed for another URL (the signature covers our message id in the query): refused too.
    other = path.replace(str(message.pk), str(uuid.uuid4()))
    assert requests.post(receiver + other, data=form, headers=headers, timeout=10).status_code == 403
    assert Message.objects.get(pk=message.pk).state == "dispatched" and not Receipt.objects.exists()


@pytest.mark.parametrize("sig", ["0" * 64, "é" * 64, "\u2603", ""], ids=["wrong", "non-ascii", "snowman", "empty"])
def test_a_bad_or_non_ascii_vonage_sig_is_403_never_500(live, receiver, dispatched, sig):
    message = dispatched("vonage")
    params = {**vonage_dlr(message_id=str(message.pk), provider_message_id=message.provider_message_id), "sig": sig}
    url = receiver + VONAGE_PATH
    answers = [
        requests.post(url, data=params, timeout=10).status_code,
        requests.get(url + "?" + urlencode(params), timeout=10).status_code,
        post_json(url, params).status_code,
        post_json(url, {**params, "sig": [sig]}).status_code,
    ]
    assert answers == [403] * 4
    assert Message.objects.get(pk=message.pk).state == "dispatched" and not Receipt.objects.exists()


# --- Mailgun: replays -----------------------------------------------------------------------------
def test_a_mailgun_token_is_taken_once_by_every_web_process(live, dispatched):
    # gunicorn runs two processes, and the intake is a third: the tokens they have seen are shared through Redis. The
    # signature leaves the body out, so a replay may carry any event: all but one are refused.
    message = dispatched("mailgun", "email")
    body = mailgun_body(mailgun_event_for(message))
    failed = {**body, "event-data": mailgun_event_for(message, event="failed", severity="permanent")}
    urls = [
        base + path
        for base in (live.web_url, live.receipts_url)
        for path in (MAILGUN_TRACKING_PATH, MAILGUN_PROVIDER_PATH)
    ]
    attempts = [(urls[n % 4], body if n % 3 else failed) for n in range(16)]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda attempt: post_json(*attempt).status_code, attempts))
    assert sum(code in (200, 204) for code in codes) == 1 and codes.count(403) == 15, codes
    assert Receipt.objects.filter(provider="mailgun").count() == 1
    # Later, whichever door: still refused.
    assert (
        all(post_json(url, body).status_code == 403 for url in urls) and post_json(urls[3], failed).status_code == 403
    )


# "ahead" by 310 s, not 301: the timestamp is rounded down and the request takes its time, both of
# which bring a future timestamp closer (a loaded run saw 301 s ahead arrive inside the 300 s).
@pytest.mark.parametrize(("age", "case"), [(301, "stale"), (3600, "an hour old"), (-310, "ahead")])
def test_a_mailgun_signature_outside_five_minutes_is_403(live, receiver, dispatched, age, case):
    message = dispatched("mailgun", "email")
    for path in (MAILGUN_TRACKING_PATH, MAILGUN_PROVIDER_PATH):
        body = mailgun_body(mailgun_event_for(message), timestamp=str(int(time.time() - age)))
        assert post_json(receiver + path, body).status_code == 403, (path, case)
    assert Message.objects.get(pk=message.pk).state == "dispatched" and not Receipt.objects.exists()


@pytest.fixture
def web_without_redis(live):
    """A web process of the stack whose Redis is not there; stopped by pid afterwards."""
    port = free_port()
    process = ManagedProcess(
        f"web-no-redis-{port}",
        [PYTHON, "-m", "gunicorn", "conductor_project.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1"],
        {**live.env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
        live.log_dir,
    ).start()
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, what="web without redis")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


def test_with_redis_down_a_mailgun_webhook_is_503_and_taken_once_redis_is_back(live, dispatched, web_without_redis):
    # Closed: without the tokens seen, a replay cannot be told from a new webhook; Mailgun retries.
    message = dispatched("mailgun", "email")
    body = mailgun_body(mailgun_event_for(message))
    for path in (MAILGUN_TRACKING_PATH, MAILGUN_PROVIDER_PATH):
        response = post_json(web_without_redis + path, body)
        assert response.status_code == 503 and "retry" in response.json()["detail"]
    assert not Receipt.objects.exists()
    assert post_json(live.web_url + MAILGUN_TRACKING_PATH, body).status_code == 200  # the retry
    applied(message)


# --- malformed receipts ---------------------------------------------------------------------------
LONG = "x" * 300


def vonage_case(**overrides):
    return lambda m, url: ("json", VONAGE_PATH, vonage_signed(vonage_dlr(message_id=str(m.pk), **overrides)))


def mailgun_case(path=MAILGUN_TRACKING_PATH, **data):
    return lambda m, url: ("json", path, mailgun_body(mailgun_event(message_id=str(m.pk), **data)))


def twilio_case(**kwargs):
    def build(m, url):
        # Signed for the stack's URL, as Twilio signs the callback URL it was given.
        path, form, headers = twilio_callback(url, **{"message_id": str(m.pk), **kwargs})
        return "form", path, (form, headers)

    return build


def raw(path, body: bytes):
    return lambda m, url: ("raw", path, body)


NOT_OURS = {"user-variables": {"conductor_message_id": "m-1"}}
MALFORMED = {
    "vonage-json-list": (raw(VONAGE_PATH, b"[1, 2]"), "not a JSON object"),
    "vonage-not-json": (raw(VONAGE_PATH, b"{messageId: 1"), "not JSON"),
    "vonage-messageId-number": (vonage_case(messageId=12345), "messageId"),
    "vonage-messageId-list": (vonage_case(messageId=["a", "b"]), "messageId"),
    "vonage-client-ref-not-ours": (vonage_case(**{"client-ref": "x.1"}), "message_id"),
    "vonage-messageId-too-long": (vonage_case(messageId="m" * 129), "provider_message_id"),
    "vonage-err-code-too-long": (vonage_case(**{"err-code": "9" * 65}), "error_code"),
    "mailgun-user-variables-list": (mailgun_case(**{"user-variables": ["a"]}), "custom variables"),
    "mailgun-user-variables-text": (mailgun_case(MAILGUN_PROVIDER_PATH, **{"user-variables": "a"}), "custom variables"),
    "mailgun-message-id-list": (mailgun_case(message={"headers": {"message-id": ["a@b"]}}), ""),
    "mailgun-message-id-too-long": (mailgun_case(message={"headers": {"message-id": LONG}}), "provider_message_id"),
    "mailgun-event-id-too-long": (mailgun_case(MAILGUN_PROVIDER_PATH, id=LONG), "event_id"),
    "mailgun-not-a-uuid": (
        lambda m, url: ("json", MAILGUN_TRACKING_PATH, mailgun_body(mailgun_event(**NOT_OURS))),
        "UUID",
    ),
    "mailgun-not-json": (raw(MAILGUN_PROVIDER_PATH, b"{event"), ""),
    "twilio-not-a-uuid": (twilio_case(message_id="m-1"), "message_id"),
    "twilio-sid-too-long": (twilio_case(sid="SM" + "0" * 127), "provider_message_id"),
    "twilio-status-too-long": (twilio_case(status="s" * 65), "provider_status"),
    "twilio-error-code-too-long": (twilio_case(ErrorCode="3" * 65), "error_code"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_receipt_is_400_naming_what_is_wrong(live, receiver, dispatched, case):
    build, field = MALFORMED[case]
    message = dispatched(case.split("-")[0], "email" if case.startswith("mailgun") else "sms")
    kind, path, payload = build(message, receiver)
    url = receiver + path
    if kind == "raw":
        response = requests.post(url, data=payload, headers={"Content-Type": "application/json"}, timeout=10)
    elif kind == "json":
        response = post_json(url, payload)
    else:
        form, headers = payload
        response = requests.post(url, data=form, headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    assert field in response.json()["detail"], response.text
    assert Message.objects.get(pk=message.pk).state == "dispatched" and not Receipt.objects.exists()
