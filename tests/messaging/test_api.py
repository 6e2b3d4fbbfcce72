"""The messages API in-process: validation, idempotency codes, scoping, listing, cancel."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import Message, MessageEvent

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/"
GOOD = {"channel": "sms", "to": "+14155552671", "body": "Your code is 123456", "priority": "critical"}


def post(api, data, **extra):
    return api.post(URL, data=json.dumps(data), content_type="application/json", **extra)


def test_create_returns_201_with_the_accepted_message(api):
    response = post(api, {**GOOD, "category": "otp", "metadata": {"user": 7}})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "accepted" and body["priority"] == "critical" and body["category"] == "otp"
    assert body["to"] == "+14155552671"
    message = Message.objects.get(pk=body["id"])
    # critical's default deadline is 5 minutes
    assert abs((message.expires_at - message.created_at).total_seconds() - 300) < 1
    assert MessageEvent.objects.filter(message=message, to_state="accepted").count() == 1


def test_numbers_are_normalised_to_e164(api):
    response = post(api, {**GOOD, "to": "+1 (415) 555-2671"})
    assert response.status_code == 201
    assert response.json()["to"] == "+14155552671"


def test_no_credentials_is_401_and_a_wrong_key_is_401(client):
    assert client.post(URL, data=GOOD, content_type="application/json").status_code == 401
    response = client.post(URL, data=GOOD, content_type="application/json", HTTP_AUTHORIZATION="Bearer cnd_nope")
    assert response.status_code == 401


def test_idempotency_replay_and_conflict(api):
    first = post(api, GOOD, HTTP_IDEMPOTENCY_KEY="k-1")
    assert first.status_code == 201
    again = post(api, GOOD, HTTP_IDEMPOTENCY_KEY="k-1")
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    conflict = post(api, {**GOOD, "body": "another text"}, HTTP_IDEMPOTENCY_KEY="k-1")
    assert conflict.status_code == 422
    assert "idempotency_key" in conflict.json()
    # The key can also travel in the body.
    in_body = post(api, {**GOOD, "idempotency_key": "k-1"})
    assert in_body.status_code == 200
    assert Message.objects.count() == 1


def test_idempotency_keys_are_scoped_per_client(api, other_api):
    assert post(api, GOOD, HTTP_IDEMPOTENCY_KEY="shared").status_code == 201
    assert post(other_api, GOOD, HTTP_IDEMPOTENCY_KEY="shared").status_code == 201
    assert Message.objects.count() == 2


def test_header_and_body_keys_must_agree(api):
    response = post(api, {**GOOD, "idempotency_key": "a"}, HTTP_IDEMPOTENCY_KEY="b")
    assert response.status_code == 400 and "idempotency_key" in response.json()


BAD_INPUTS = [
    ({"channel": "fax"}, "channel"),
    ({"priority": "urgent"}, "priority"),
    ({"to": "4155552671"}, "to"),
    ({"to": "+1415555"}, "to"),
    ({"to": "not a number"}, "to"),
    ({"channel": "whatsapp", "to": "+999"}, "to"),
    ({"body": "x" * 1601}, "body"),
    ({"body": ""}, "body"),
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"ttl_seconds": -5}, "ttl_seconds"),
    ({"ttl_seconds": 60, "expires_at": "2099-01-01T00:00:00Z"}, "ttl_seconds"),
    ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
    ({"expires_at": "tomorrow"}, "expires_at"),
    ({"fallback_channels": ["pigeon"]}, "fallback_channels"),
    ({"fallback_channels": ["whatsapp"]}, "fallback_to"),
    ({"fallback_channels": ["whatsapp"], "fallback_to": {"whatsapp": "nope"}}, "fallback_to"),
    ({"metadata": ["not", "an", "object"]}, "metadata"),
    ({"priorty": "bulk"}, "priorty"),
    ({"channel": "email", "to": "not-an-address"}, "to"),
    ({"channel": "email", "to": "+14155552671"}, "to"),
]


@pytest.mark.parametrize("change,field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_400_naming_the_field_and_stores_nothing(api, change, field):
    data = {**GOOD, **change}
    response = post(api, data)
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert Message.objects.count() == 0


def test_a_channel_with_no_provider_route_is_refused(api, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {"sms": ["twilio"], "whatsapp": [], "email": ["smtp"]}}
    response = post(api, {**GOOD, "channel": "whatsapp"})
    assert response.status_code == 400 and "channel" in response.json()
    assert Message.objects.count() == 0


def test_missing_required_fields_are_named(api):
    response = post(api, {})
    assert response.status_code == 400
    assert {"channel", "to", "body"} <= set(response.json())


def test_malformed_json_is_400(api):
    response = api.post(URL, data='{"channel": "sms",', content_type="application/json")
    assert response.status_code == 400
    assert "JSON" in response.json()["detail"]
    assert Message.objects.count() == 0


def test_ttl_sets_the_deadline(api):
    response = post(api, {**GOOD, "ttl_seconds": 90})
    message = Message.objects.get(pk=response.json()["id"])
    assert abs((message.expires_at - message.created_at).total_seconds() - 90) < 1


def test_another_clients_message_is_404(api, other_api):
    message_id = post(api, GOOD).json()["id"]
    assert other_api.get(f"{URL}{message_id}/").status_code == 404
    assert other_api.post(f"{URL}{message_id}/cancel/").status_code == 404
    assert other_api.get(URL).json()["results"] == []
    assert api.get(f"{URL}{message_id}/").status_code == 200


def test_detail_has_attempts_events_and_receipts(api):
    message_id = post(api, GOOD).json()["id"]
    body = api.get(f"{URL}{message_id}/").json()
    assert body["attempts"] == [] and body["receipts"] == []
    assert [e["to_state"] for e in body["events"]] == ["accepted"]


RECEIPT_FIELDS = [
    "received_at",
    "provider",
    "provider_message_id",
    "provider_status",
    "mapped_state",
    "error_code",
    "applied",
    "source",
]


def test_a_receipt_is_shown_as_its_documented_fields_never_its_payload(api):
    from messaging.receipts import receipt_record
    from providers.types import ReceiptEvent

    message_id = post(api, GOOD).json()["id"]
    Message.objects.filter(pk=message_id).update(state="dispatched", provider="twilio", provider_message_id="SM9")
    payload = {"MessageSid": "SM9", "MessageStatus": "undelivered", "ErrorCode": "30003", "AccountSid": "AC1"}
    event = ReceiptEvent(
        provider="twilio",
        event_id="SM9:undelivered",
        provider_message_id="SM9",
        provider_status="undelivered",
        state="undelivered",
        message_id=message_id,
        error_code="30003",
        payload=payload,
    )
    receipt_record(event=event)
    [receipt] = api.get(f"{URL}{message_id}/").json()["receipts"]
    assert list(receipt) == RECEIPT_FIELDS
    assert {key: receipt[key] for key in RECEIPT_FIELDS[1:]} == {
        "provider": "twilio",
        "provider_message_id": "SM9",
        "provider_status": "undelivered",
        "mapped_state": "undelivered",
        "error_code": "30003",
        "applied": True,
        "source": "webhook",
    }


def test_the_schema_documents_each_receipt_field(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    receipt = schema["components"]["schemas"]["Receipt"]["properties"]
    assert list(receipt) == RECEIPT_FIELDS
    assert all(field.get("description") for field in receipt.values()), receipt


def test_list_filters_and_cursor_pagination(api):
    for i in range(7):
        post(api, {**GOOD, "priority": "bulk" if i % 2 else "critical", "category": f"c{i % 3}"})
    assert len(api.get(URL, {"priority": "bulk"}).json()["results"]) == 3
    assert len(api.get(URL, {"category": "c0"}).json()["results"]) == 3
    assert len(api.get(URL, {"state": "accepted", "channel": "sms"}).json()["results"]) == 7
    future = (timezone.now() + timedelta(hours=1)).isoformat()
    assert len(api.get(URL, {"created_after": future}).json()["results"]) == 0
    assert len(api.get(URL, {"created_before": future}).json()["results"]) == 7
    seen, page = [], api.get(URL, {"page_size": 3}).json()
    while True:
        seen += [m["id"] for m in page["results"]]
        if not page["next"]:
            break
        page = api.get(page["next"]).json()
    assert len(seen) == len(set(seen)) == 7
    bad = api.get(URL, {"state": "lost"})
    assert bad.status_code == 400 and "state" in bad.json()


def test_cancel_before_dispatch_and_409_after(api):
    message_id = post(api, GOOD).json()["id"]
    response = api.post(f"{URL}{message_id}/cancel/")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert api.post(f"{URL}{message_id}/cancel/").status_code == 409


def test_cancel_is_refused_while_a_worker_is_sending(api):
    message_id = post(api, GOOD).json()["id"]
    Message.objects.filter(pk=message_id).update(lease_expires_at=timezone.now() + timedelta(seconds=30))
    assert api.post(f"{URL}{message_id}/cancel/").status_code == 409
    assert Message.objects.get(pk=message_id).state == "accepted"


def test_batch_items_succeed_or_fail_on_their_own_in_order(api):
    items = [
        GOOD,
        {**GOOD, "to": "bad"},
        {**GOOD, "idempotency_key": "b-1"},
        {**GOOD, "idempotency_key": "b-1"},
        {**GOOD, "idempotency_key": "b-1", "body": "changed"},
        "not an object",
    ]
    response = api.post(f"{URL}batch/", data=json.dumps({"messages": items}), content_type="application/json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert [r["status"] for r in body["results"]] == [201, 400, 201, 200, 422, 400]
    assert [r["index"] for r in body["results"]] == list(range(6))
    assert "to" in body["results"][1]["errors"]
    assert body["created"] == 2 and body["replayed"] == 1 and body["failed"] == 3
    assert Message.objects.count() == 2


def test_batch_over_the_limit_is_400_and_stores_nothing(api):
    response = api.post(f"{URL}batch/", data=json.dumps({"messages": [GOOD] * 1001}), content_type="application/json")
    assert response.status_code == 400 and "messages" in response.json()
    assert Message.objects.count() == 0


def test_schema_and_health_endpoints(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/api/schema/").status_code == 200
    assert client.get("/api/docs/").status_code == 200


def test_the_openapi_schema_is_valid_and_generates_without_warnings(tmp_path):
    from django.core.management import call_command

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))
    schema = (tmp_path / "schema.yml").read_text()
    assert "/api/v1/dead-letters/replay/" in schema and "bearer" in schema
