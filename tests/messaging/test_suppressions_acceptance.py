"""The check at acceptance: a message to a suppressed address is stored `failed` (error type
suppressed) through the transition service, never published; one look-up for a whole batch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from prometheus_client import REGISTRY

from messaging.models import Callback, DeadLetter, MessageEvent
from messaging.suppressions.services import suppression_add, suppression_lift
from tests.support.callback_rows import endpoint_make

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"
SMS = {"channel": "sms", "to": NUMBER, "body": "hello", "category": "promo"}


@pytest.fixture
def broker(monkeypatch) -> list[tuple[str, list]]:
    """Every task the API hands the broker (name, args): the seam under both publish paths."""
    sent: list[tuple[str, list]] = []
    fake = SimpleNamespace(send_task=lambda name, args, queue, **options: sent.append((name, args)))
    monkeypatch.setattr("messaging.publish.current_app", fake)
    return sent


def published_ids(sent) -> set[str]:
    return {str(i) for _, args in sent for i in (args[0] if isinstance(args[0], list) else [args[0]])}


def suppressed_count(channel: str = "sms") -> float:
    value = REGISTRY.get_sample_value(
        "conductor_messages_suppressed_total", {"channel": channel, "stage": "acceptance"}
    )
    return value or 0.0


def suppression_queries(context: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in context.captured_queries if '"messaging_suppression"' in q["sql"]]


def test_a_single_message_to_a_suppressed_number_is_stored_failed_with_its_dead_letter(
    api, client_key, broker, django_capture_on_commit_callbacks
):
    acme = client_key[0]
    endpoint_make(acme)
    suppression, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    before = suppressed_count()
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post("/api/v1/messages/", SMS, format="json")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["state"] == "failed" and body["failed_at"]
    assert body["last_error"] == {
        "type": "suppressed",
        "code": "stop_keyword",
        "message": f"the sms address is suppressed (stop_keyword, suppression {suppression.pk})",
    }
    events = MessageEvent.objects.filter(message_id=body["id"]).order_by("id")
    assert [(e.from_state, e.to_state, e.applied) for e in events] == [
        ("", "accepted", True),
        ("accepted", "failed", True),
    ]
    assert "refused at acceptance" in events[1].detail
    dead = DeadLetter.objects.get(message_id=body["id"])
    assert dead.error_type == "suppressed" and dead.state == "failed"
    assert sorted(Callback.objects.filter(message_id=body["id"]).values_list("event", flat=True)) == [
        "accepted",
        "failed",
    ]
    assert broker == []  # never handed to a dispatch queue
    assert suppressed_count() == before + 1
    # The same key again replays the stored answer; nothing more is stored or sent.
    again = api.post("/api/v1/messages/", {**SMS, "idempotency_key": "k1"}, format="json")
    replay = api.post("/api/v1/messages/", {**SMS, "idempotency_key": "k1"}, format="json")
    assert again.status_code == 201 and replay.status_code == 200 and replay.json()["state"] == "failed"
    assert broker == []


def test_a_batch_pays_one_look_up_and_only_suppressed_items_fail(
    api, client_key, other_api, broker, django_capture_on_commit_callbacks
):
    acme = client_key[0]
    acme.opt_out_exempt_categories = ["otp"]
    acme.save()
    suppression_add(client=acme, channel="sms", address="+14155550003", reason="stop_keyword")
    suppression_add(client=acme, channel="sms", address="+14155550005", reason="unsubscribed", scope="promo")
    suppression_add(client=acme, channel="email", address="Ada@Example.com", reason="hard_bounce")
    lifted, _ = suppression_add(client=acme, channel="sms", address="+14155550009", reason="manual")
    suppression_lift(suppression=lifted, reason="asked again")
    items = [{**SMS, "to": f"+1415555{i:04d}"} for i in range(200)]
    items[4] = {**items[3], "category": "otp"}  # exempt from a STOP: sent
    items[6] = {**items[5], "category": "receipts"}  # the suppression covers promo only: sent
    items[7] = {"channel": "email", "to": "ada@example.com", "body": "hi", "subject": "s", "category": "otp"}
    items[8] = {**items[3], "expires_at": "2099-01-01T00:00:00Z"}  # the serializer's path, not the fast one
    items[10] = {**items[3], "fallback_channels": ["email"], "fallback_to": {"email": "bob@example.com"}}
    before = suppressed_count()
    with django_capture_on_commit_callbacks(execute=True), CaptureQueriesContext(connection) as queries:
        response = api.post(
            "/api/v1/messages/batch/", data=json.dumps({"messages": items}), content_type="application/json"
        )
    assert response.status_code == 200
    assert len(suppression_queries(queries)) == 1  # one look-up for the batch, not one per message
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201] * 200
    failed = {r["index"] for r in results if r["message"]["state"] == "failed"}
    assert failed == {3, 5, 7, 8}  # the STOP, the promo one, the hard bounce (even otp), the serializer path
    assert results[7]["message"]["last_error"]["type"] == "suppressed"
    assert all(r["message"]["state"] == "accepted" for r in results if r["index"] not in failed)
    ids = {r["index"]: r["message"]["id"] for r in results}
    assert published_ids(broker) == {ids[i] for i in range(200) if i not in failed}
    assert DeadLetter.objects.filter(message_id__in=[ids[i] for i in failed], error_type="suppressed").count() == 4
    assert suppressed_count() == before + 3 and suppressed_count("email") >= 1
    # Another client's messages to the same numbers are not affected.
    other = other_api.post("/api/v1/messages/", {**SMS, "to": "+14155550003"}, format="json")
    assert other.json()["state"] == "accepted"


def test_a_batch_without_suppressions_pays_one_query_and_publishes_everything(
    api, broker, django_capture_on_commit_callbacks
):
    items = [{**SMS, "to": f"+1415555{i:04d}"} for i in range(300)]
    with django_capture_on_commit_callbacks(execute=True), CaptureQueriesContext(connection) as queries:
        body = api.post(
            "/api/v1/messages/batch/", data=json.dumps({"messages": items}), content_type="application/json"
        ).json()
    assert len(suppression_queries(queries)) == 1 and body["created"] == 300
    assert len(published_ids(broker)) == 300 and not DeadLetter.objects.exists()


def test_an_ordered_message_to_a_suppressed_number_fails_and_does_not_hold_its_key(
    api, client_key, broker, django_capture_on_commit_callbacks
):
    suppression_add(client=client_key[0], channel="sms", address=NUMBER, reason="manual")
    with django_capture_on_commit_callbacks(execute=True):
        first = api.post("/api/v1/messages/", {**SMS, "ordering_key": "o1"}, format="json").json()
        second = api.post("/api/v1/messages/", {**SMS, "to": "+14155552672", "ordering_key": "o1"}, format="json")
    assert first["state"] == "failed" and first["last_error"]["type"] == "suppressed"
    assert published_ids(broker) == {second.json()["id"]}


def test_lifted_suppressions_and_other_channels_do_not_stop_a_message(api, client_key, broker):
    suppression_add(client=client_key[0], channel="whatsapp", address=NUMBER, reason="manual")
    assert api.post("/api/v1/messages/", SMS, format="json").json()["state"] == "accepted"  # sms, not whatsapp
    sms, _ = suppression_add(client=client_key[0], channel="sms", address=NUMBER, reason="manual")
    assert api.post("/api/v1/messages/", SMS, format="json").json()["state"] == "failed"
    suppression_lift(suppression=sms, reason="asked again")
    assert api.post("/api/v1/messages/", SMS, format="json").json()["state"] == "accepted"
