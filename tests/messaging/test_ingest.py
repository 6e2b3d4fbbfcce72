"""Batch ingest: a 1,000-message batch in a few statements, with the per-item answers, rows,
idempotency and ordering of one-by-one creation; the fast validation and rendering give exactly
what the serializers give."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from messaging.api.serializers import (
    MessageCreateSerializer,
    MessageSerializer,
    _fast_validated,
    message_create_validate,
    message_renderer,
)
from messaging.ingest import (
    BatchItem,
    CreateOutcome,
    IdempotencyConflict,
    idempotency_lock_id,
    messages_create_many,
    request_fingerprint,
)
from messaging.models import ApiClient, Message, MessageEvent
from messaging.publish import DISPATCH_BATCH_TASK
from messaging.routing import queue_name
from messaging.services import message_create, message_transition
from tests.messaging.test_api import BAD_INPUTS

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/batch/"
BULK = {"channel": "sms", "to": "+14155552671", "body": "20% off today", "priority": "bulk", "category": "promo"}


def campaign(count: int, **fields) -> list[dict]:
    """Bulk SMS to distinct valid numbers (San Francisco's 415-555-xxxx)."""
    return [{**BULK, "to": f"+1415555{i:04d}", **fields} for i in range(count)]


def serializer_errors(data) -> dict:
    serializer = MessageCreateSerializer(data=data)
    assert not serializer.is_valid()
    return serializer.errors


def post_batch(api, items: list) -> dict:
    response = api.post(URL, data=json.dumps({"messages": items}), content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()


@pytest.fixture
def published(monkeypatch) -> list[list[tuple]]:
    """The (id, channel, priority) lists the batch handed to messages_publish, one list per call."""
    calls: list[list[tuple]] = []
    monkeypatch.setattr("messaging.ingest.messages_publish", lambda *, messages: calls.append(list(messages)))
    return calls


@pytest.fixture
def published_one_by_one(monkeypatch) -> list[str]:
    """Ids published through message_publish: the per-item path (ordering keys)."""
    sent: list[str] = []

    def publish(*, message_id, channel, priority, countdown=None):
        sent.append(str(message_id))
        return True

    monkeypatch.setattr("messaging.publish.message_publish", publish)
    monkeypatch.setattr("messaging.ingest.message_publish", publish)
    return sent


def test_a_full_batch_is_stored_and_published_in_a_few_statements(
    api, published, django_assert_max_num_queries, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True), django_assert_max_num_queries(15):
        body = post_batch(api, campaign(1000))
    assert (body["created"], body["replayed"], body["failed"]) == (1000, 0, 0)
    assert [r["status"] for r in body["results"]] == [201] * 1000
    assert [r["index"] for r in body["results"]] == list(range(1000))
    ids = [r["message"]["id"] for r in body["results"]]
    assert [r["message"]["to"] for r in body["results"]] == [item["to"] for item in campaign(1000)]
    assert Message.objects.filter(pk__in=ids, state="accepted").count() == 1000
    assert MessageEvent.objects.filter(message_id__in=ids, to_state="accepted", from_state="").count() == 1000
    # One publish for the batch, every id in order (messages_publish groups bulk ones into batch tasks).
    assert len(published) == 1
    assert [(str(i), c, p) for i, c, p in published[0]] == [(i, "sms", "bulk") for i in ids]
    # Acceptance times keep the batch's order, as one by one.
    by_time = Message.objects.order_by("created_at").values_list("pk", flat=True)
    assert [str(pk) for pk in by_time] == ids


def test_keyed_items_are_locked_and_looked_up_in_one_statement_each(api, published, django_assert_max_num_queries):
    with django_assert_max_num_queries(15):
        body = post_batch(api, [{**item, "idempotency_key": f"k-{i}"} for i, item in enumerate(campaign(1000))])
    assert body["created"] == 1000
    with django_assert_max_num_queries(15):
        again = post_batch(api, [{**item, "idempotency_key": f"k-{i}"} for i, item in enumerate(campaign(1000))])
    assert again["replayed"] == 1000 and Message.objects.count() == 1000
    assert [r["message"]["id"] for r in again["results"]] == [r["message"]["id"] for r in body["results"]]


def test_bulk_items_go_to_the_broker_as_batch_tasks(api, monkeypatch, settings, django_capture_on_commit_callbacks):
    # The fixed-id batches (messaging.fair off); fair ones: tests/messaging/test_bulk.py.
    settings.CONDUCTOR = {**settings.CONDUCTOR, "BULK_BATCH_SIZE": 100, "BULK_FAIR_SHARING": False}
    sent: list[tuple[str, list, str]] = []
    broker = SimpleNamespace(send_task=lambda name, args, queue, **options: sent.append((name, args, queue)))
    monkeypatch.setattr("messaging.publish.current_app", broker)
    with django_capture_on_commit_callbacks(execute=True):
        body = post_batch(api, campaign(250) + [{**BULK, "priority": "critical"}])
    ids = [r["message"]["id"] for r in body["results"]]
    batches = [(args[0], queue) for name, args, queue in sent if name == DISPATCH_BATCH_TASK]
    assert [len(batch) for batch, _ in batches] == [100, 100, 50]
    assert [i for batch, _ in batches for i in batch] == ids[:250]
    assert {queue for _, queue in batches} == {queue_name("sms", "bulk")}
    assert [(name, args) for name, args, _ in sent if name != DISPATCH_BATCH_TASK] == [
        ("messaging.dispatch", [ids[250]])
    ]


def test_mixed_items_keep_their_order_and_their_own_errors(api, published):
    items = [
        BULK,
        {**BULK, "to": "bad"},
        {**BULK, "channel": "fax"},
        {**BULK, "priorty": "bulk"},
        "not an object",
        {**BULK, "ttl_seconds": 0},
        {**BULK, "channel": "email", "to": "ana@example.com", "subject": "Hi"},
        {**BULK, "body": "x" * 1601},
        {**BULK, "ttl_seconds": 90, "metadata": {"campaign": 7}},
    ]
    body = post_batch(api, items)
    assert [r["status"] for r in body["results"]] == [201, 400, 400, 400, 400, 400, 201, 400, 201]
    assert [r["index"] for r in body["results"]] == list(range(len(items)))
    for result, item in zip(body["results"], items, strict=True):
        if result["status"] == 400:
            assert result["errors"] == serializer_errors(item)
            assert "message" not in result
    assert "to" in body["results"][1]["errors"] and "channel" in body["results"][2]["errors"]
    assert "priorty" in body["results"][3]["errors"] and "ttl_seconds" in body["results"][5]["errors"]
    assert "body" in body["results"][7]["errors"]
    assert (body["created"], body["replayed"], body["failed"]) == (3, 0, 6)
    assert Message.objects.count() == 3


def test_idempotent_replays_and_conflicts_inside_a_batch_and_across_batches(api, other_api, published):
    first = post_batch(
        api,
        [
            {**BULK, "idempotency_key": "a"},
            {**BULK, "idempotency_key": "a"},  # the same request again: a replay of the first
            {**BULK, "idempotency_key": "a", "body": "changed"},  # same key, another payload
            {**BULK, "idempotency_key": "b"},
            BULK,
        ],
    )
    assert [r["status"] for r in first["results"]] == [201, 200, 422, 201, 201]
    a_id = first["results"][0]["message"]["id"]
    assert first["results"][1]["message"]["id"] == a_id
    assert first["results"][2]["errors"]["message_id"] == a_id and "idempotency_key" in first["results"][2]["errors"]
    assert (first["created"], first["replayed"], first["failed"]) == (3, 1, 1)

    second = post_batch(
        api,
        [
            {**BULK, "idempotency_key": "b"},
            {**BULK, "idempotency_key": "a", "body": "changed"},
            {**BULK, "idempotency_key": "c"},
        ],
    )
    assert [r["status"] for r in second["results"]] == [200, 422, 201]
    assert second["results"][0]["message"] == first["results"][3]["message"]
    assert Message.objects.count() == 4
    # Keys are per client.
    assert [r["status"] for r in post_batch(other_api, [{**BULK, "idempotency_key": "a"}])["results"]] == [201]
    # And the single endpoint answers the batch's keys the same way.
    single = api.post(
        "/api/v1/messages/", data=json.dumps({**BULK, "idempotency_key": "c"}), content_type="application/json"
    )
    assert single.status_code == 200 and single.json()["id"] == second["results"][2]["message"]["id"]


def test_a_key_another_request_holds_is_409_and_the_rest_is_stored(api, client_key, published):
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [idempotency_lock_id(client_key[0].pk, "busy")])
                held.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        body = post_batch(api, [{**BULK, "idempotency_key": "busy"}, {**BULK, "idempotency_key": "free"}])
    finally:
        release.set()
        holder.join()
    assert [r["status"] for r in body["results"]] == [409, 201]
    assert "idempotency_key" in body["results"][0]["errors"]
    assert list(Message.objects.values_list("idempotency_key", flat=True)) == ["free"]


@pytest.mark.django_db(transaction=True)
def test_a_twin_stored_between_the_lookup_and_the_insert_is_replayed(client_key, monkeypatch):
    """A writer that did not take our lock (SQLite has none) stores a key first: the bulk INSERT
    fails on the unique key, and the keyed items are settled one by one."""
    monkeypatch.setattr("messaging.ingest.messages_publish", lambda *, messages: None)
    client = client_key[0]
    fields = message_create_validate(BULK)[0]
    twin: list[Message] = []

    def store_twin() -> None:
        try:
            now = timezone.now()
            twin.append(
                Message.objects.create(
                    client=client,
                    channel="sms",
                    to=fields["to"],
                    body=fields["body"],
                    priority="bulk",
                    category="promo",
                    idempotency_key="twin",
                    request_fingerprint=request_fingerprint(fields),
                    expires_at=now + timedelta(hours=1),
                    created_at=now,
                )
            )
        finally:
            connection.close()

    def before_insert(execute, sql, params, many, context):
        # The messages' table only (a bare prefix would also match messaging_messageevent).
        if sql.startswith(('INSERT INTO "messaging_message" ', 'COPY "messaging_message" ')) and not twin:
            thread = threading.Thread(target=store_twin)
            thread.start()
            thread.join()
        return execute(sql, params, many, context)

    items = [BatchItem(fields, "twin"), BatchItem(fields, None), BatchItem({**fields, "body": "other"}, "twin")]
    with connection.execute_wrapper(before_insert):
        results = messages_create_many(client=client, items=items)
    assert isinstance(results[0], CreateOutcome) and not results[0].created
    assert results[0].message.pk == twin[0].pk
    assert isinstance(results[1], CreateOutcome) and results[1].created
    assert isinstance(results[2], IdempotencyConflict) and results[2].message.pk == twin[0].pk
    assert Message.objects.count() == 2
    events = list(MessageEvent.objects.values_list("message_id", "source", "to_state", "created_at"))
    assert len(events) == 1, events  # the twin was stored bare


def test_ordering_key_items_still_get_sequences_and_wait(
    api, published, published_one_by_one, django_capture_on_commit_callbacks
):
    items = [
        BULK,
        {**BULK, "priority": "transactional", "ordering_key": "order-1"},
        {**BULK, "priority": "transactional", "ordering_key": "order-1", "idempotency_key": "o-2"},
        {**BULK, "priority": "transactional", "ordering_key": "order-2"},
        {**BULK, "idempotency_key": "o-2"},  # the ordered item's key, another payload (in order: after it)
        {**BULK, "priority": "transactional", "ordering_key": "order-1", "idempotency_key": "o-2"},  # a replay
    ]
    with django_capture_on_commit_callbacks(execute=True):
        body = post_batch(api, items)
    assert [r["status"] for r in body["results"]] == [201, 201, 201, 201, 422, 200]
    messages = {r["index"]: r["message"] for r in body["results"] if "message" in r}
    assert [messages[i]["sequence"] for i in (0, 1, 2, 3, 5)] == [None, 1, 2, 1, 2]
    assert body["results"][4]["errors"]["message_id"] == messages[2]["id"] == messages[5]["id"]
    assert messages[2]["waiting_for"] == messages[1]["id"]  # held back by its predecessor
    stored = Message.objects.get(pk=messages[2]["id"])
    assert (stored.sequence, stored.ordering_mode, str(stored.waiting_for_id)) == (2, "dispatched", messages[1]["id"])
    # Published one by one, except the one waiting (its predecessor's move publishes it).
    assert published_one_by_one == [messages[1]["id"], messages[3]["id"]]
    assert [str(i) for i, _, _ in published[0]] == [messages[0]["id"]]


def test_a_database_failure_mid_batch_stores_nothing_and_answers_503_per_item(
    api, published, published_one_by_one, django_capture_on_commit_callbacks
):
    event_inserts = []

    def fail_on_the_second_event_insert(execute, sql, params, many, context):
        if sql.startswith(('INSERT INTO "messaging_messageevent"', 'COPY "messaging_messageevent"')):
            event_inserts.append(sql)
            if len(event_inserts) == 2:  # the bulk rows are in; the ordered item's event fails
                raise OperationalError("server closed the connection unexpectedly")
        return execute(sql, params, many, context)

    items = [*campaign(3), {**BULK, "to": "bad"}, {**BULK, "priority": "critical", "ordering_key": "k"}]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with connection.execute_wrapper(fail_on_the_second_event_insert):
            body = post_batch(api, items)
    assert [r["status"] for r in body["results"]] == [503, 503, 503, 400, 503]
    assert body["results"][0]["errors"] == {"detail": "The database is unavailable; this item was not stored."}
    assert (body["created"], body["replayed"], body["failed"]) == (0, 0, 5)
    assert Message.objects.count() == 0 and MessageEvent.objects.count() == 0
    assert callbacks == [] and published == [] and published_one_by_one == []


def test_a_batch_item_is_stored_as_message_create_stores_it(client_key, other_api, published):
    """The same fields through message_create (one client) and the batch (another): the same rows."""
    one, other = client_key[0], ApiClient.objects.get(name="globex")
    variants = [
        BULK,
        {**BULK, "priority": "critical", "ttl_seconds": 90, "metadata": {"user": 7}},
        {"channel": "email", "to": "ana@example.com", "body": "Hello", "subject": "Hi", "category": "otp"},
        {**BULK, "expires_at": (timezone.now() + timedelta(hours=2)).isoformat()},
        {**BULK, "fallback_channels": ["email"], "fallback_to": {"email": "ana@example.com"}},
    ]
    skip = {"id", "client", "created_at", "accepted_at", "enqueued_at", "updated_at", "expires_at"}
    for index, data in enumerate(variants):
        fields = message_create_validate(data)[0]
        alone = message_create(client=one, fields=dict(fields), idempotency_key=f"same-{index}").message
        (batched,) = messages_create_many(client=other, items=[BatchItem(dict(fields), f"same-{index}")])
        batched = batched.message
        alone.refresh_from_db()
        batched.refresh_from_db()
        for field in Message._meta.concrete_fields:
            if field.name not in skip:
                assert getattr(batched, field.attname) == getattr(alone, field.attname), (data, field.name)
        assert abs((batched.expires_at - batched.created_at) - (alone.expires_at - alone.created_at)) < timedelta(
            seconds=1
        )
        assert batched.created_at == batched.accepted_at == batched.enqueued_at
        events = [
            list(
                MessageEvent.objects.filter(message=m).values_list(
                    "source", "from_state", "to_state", "applied", "detail"
                )
            )
            for m in (alone, batched)
        ]
        assert events[0] == events[1] == [("api", "", "accepted", True, "")]


def test_each_accepted_message_is_logged_once_with_the_recipient_masked(api, published, caplog):
    caplog.set_level("INFO", logger="messaging.ingest")
    body = post_batch(api, campaign(3))
    lines = [r for r in caplog.records if getattr(r, "event", None) == "transition" and r.to_state == "accepted"]
    assert [r.message_id for r in lines] == [r["message"]["id"] for r in body["results"]]
    assert [r.to for r in lines] == ["+1415*****00", "+1415*****01", "+1415*****02"]
    assert all("5550000" not in r.getMessage() for r in lines)


# --- the fast paths give exactly what the serializers give ----------------------------------------
VALID = [
    BULK,
    {"channel": "sms", "to": " +1 (415) 555-2671 ", "body": "  spaced  "},  # trimmed number, untrimmed body
    {**BULK, "subject": "   ", "category": ""},
    {**BULK, "ttl_seconds": 60, "metadata": {"a": [1, {"b": None}]}},
    {**BULK, "idempotency_key": " k-1 ", "ordering_key": "o"},
    {"channel": "whatsapp", "to": "whatsapp:+14155552671", "body": "hola", "priority": "critical"},
    {"channel": "email", "to": "ana@example.com", "body": "é" * 10, "subject": "Ça va"},
    {**BULK, "expires_at": "2099-01-01T00:00:00Z"},
    {**BULK, "ordering_key": "o", "ordering_mode": "delivered"},
    {**BULK, "fallback_channels": ["email"], "fallback_to": {"email": "ana@example.com"}},
    {**BULK, "category": 7},  # a number where a string goes: DRF's CharField takes it
    {**BULK, "ttl_seconds": "60"},
]
INVALID = [{**BULK, **change} for change, _ in BAD_INPUTS] + [
    None,
    [],
    {},
    {**BULK, "body": "a\x00b"},
    {**BULK, "body": "\ud800"},
    {**BULK, "category": "c" * 101},
    {**BULK, "idempotency_key": "   "},
    {**BULK, "ttl_seconds": True},
    {**BULK, "metadata": {"big": "x" * 20000}},
    {**BULK, "to": None},
    {**BULK, "channel": ["sms"]},
    {**BULK, "priority": 1},
    {**BULK, "ordering_mode": "delivered"},
    {**BULK, "to": 14155552671},  # taken as a string, then refused: not E.164
]


@pytest.mark.parametrize("data", VALID + INVALID, ids=range(len(VALID + INVALID)))
def test_fast_validation_gives_the_serializers_result(data):
    serializer = MessageCreateSerializer(data=data)
    if serializer.is_valid():
        expected = (dict(serializer.validated_data), None)
    else:
        expected = (None, serializer.errors)
    got = message_create_validate(data)
    assert got == expected
    if got[0] is not None:
        assert {k: type(v) for k, v in got[0].items()} == {k: type(v) for k, v in expected[0].items()}
        assert request_fingerprint(got[0]) == request_fingerprint(expected[0])


def test_the_common_items_take_the_fast_path():
    for data in VALID[:7]:
        assert _fast_validated(data) is not None, data
    for data in INVALID + VALID[7:]:
        assert _fast_validated(data) is None, data


def test_fast_rendering_equals_the_message_serializer(make_message, client_key):
    now = timezone.now()
    first = make_message(ordering_key="k", sequence=1, ordering_mode="dispatched")
    messages = [
        first,
        make_message(ordering_key="k", sequence=2, ordering_mode="delivered", waiting_for=first, waiting_since=now),
        make_message(
            channel="email",
            to="ana@example.com",
            subject="Hi",
            priority="bulk",
            category="promo",
            idempotency_key="k-1",
            fallback_channels=["sms"],
            fallback_to={"sms": "+14155552671"},
            metadata={"user": 7, "tags": ["a"]},
        ),
        make_message(
            provider="twilio",
            provider_message_id="SM123",
            attempt_count=2,
            send_generation=3,
            next_attempt_at=now + timedelta(seconds=30),
            last_error_type="provider_5xx",
            last_error_code="503",
            last_error_message="Service Unavailable",
        ),
    ]
    message_transition(message_id=messages[3].pk, to_state="dispatched", source="worker", detail="sent")
    messages[3].refresh_from_db()
    message_transition(message_id=first.pk, to_state="cancelled", source="api", detail="cancelled")
    messages.append(Message.objects.get(pk=first.pk))  # read back from the database, not as created
    render = message_renderer()
    for message in messages:
        expected = MessageSerializer(message).data
        got = render(message)
        assert got == expected
        assert list(got) == list(expected)
        assert json.dumps(got) == json.dumps(expected)
