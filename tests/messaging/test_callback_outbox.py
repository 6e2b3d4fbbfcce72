"""The callbacks outbox: written in the transaction of the event it reports (real PostgreSQL), one
event number per message and event, to the right endpoints only, in a few statements per batch;
and the API's callback_url and callback_events."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.api.serializers import MessageCreateSerializer, _fast_validated, message_create_validate
from messaging.callbacks.outbox import callbacks_attempt_failed, secret_new
from messaging.dispatch import messages_dispatch
from messaging.ingest import BatchItem, messages_create_many
from messaging.models import (
    ApiClient,
    AttemptOutcome,
    Callback,
    CallbackEndpoint,
    DispatchAttempt,
    EventSource,
    Message,
)
from messaging.outcomes import attempt_finish_failed
from messaging.services import message_transition, messages_transition
from messaging.states import MessageState as S

pytestmark = pytest.mark.django_db

SMS = {"channel": "sms", "to": "+14155552671", "body": "code 1234", "priority": "critical", "category": "otp"}


def endpoint(client: ApiClient, url: str = "https://hooks.example.com/a", **fields) -> CallbackEndpoint:
    return CallbackEndpoint.objects.create(client=client, url=url, secrets=[secret_new(timezone.now())], **fields)


def create(client: ApiClient, **fields) -> Message:
    [outcome] = messages_create_many(client=client, items=[BatchItem({**SMS, **fields})])
    return outcome.message


def sent(message: Message, endpoint_: CallbackEndpoint | None = None) -> list[tuple[str, int]]:
    callbacks = Callback.objects.filter(message=message)
    if endpoint_ is not None:
        callbacks = callbacks.filter(endpoint=endpoint_)
    return list(callbacks.order_by("sequence", "endpoint_id").values_list("event", "sequence"))


@pytest.fixture(autouse=True)
def no_publishing(monkeypatch):
    """Accepted messages are not handed to the broker: these tests move them by hand."""
    monkeypatch.setattr("messaging.ingest.messages_publish", lambda *, messages: None)
    monkeypatch.setattr("messaging.ingest.message_publish", lambda **kwargs: None)


@pytest.fixture
def kicks(monkeypatch) -> list[int]:
    calls: list[int] = []
    monkeypatch.setattr("messaging.callbacks.outbox.callbacks_kick", lambda: calls.append(1))
    return calls


def lifecycle(message: Message) -> None:
    for state in (S.DISPATCHED, S.DELIVERED, S.READ):
        assert message_transition(message_id=message.pk, to_state=state, source=EventSource.WORKER)


# --- what is written, and when --------------------------------------------------------------------
def test_a_full_lifecycle_numbers_its_events_one_to_four_in_order(client_key):
    client = client_key[0]
    hook = endpoint(client)
    message = create(client)
    lifecycle(message)
    assert sent(message) == [("accepted", 1), ("dispatched", 2), ("delivered", 3), ("read", 4)]
    message.refresh_from_db()
    assert message.event_sequence == 4
    delivered = Callback.objects.get(message=message, event="delivered")
    assert delivered.endpoint == hook and delivered.state == "pending" and delivered.attempts == 0
    assert delivered.webhook_id.startswith("msg_") and len(delivered.webhook_id) == 36
    assert delivered.next_attempt_at == delivered.created_at
    data = delivered.payload["data"]
    assert delivered.payload["type"] == "message.delivered"
    assert delivered.payload["timestamp"] == data["occurred_at"] and data["occurred_at"].endswith("Z")
    assert data == {
        "message_id": str(message.pk),
        "event": "delivered",
        "sequence": 3,
        "occurred_at": data["occurred_at"],
        "state": "delivered",
        "previous_state": "dispatched",
        "channel": "sms",
        "priority": "critical",
        "category": "otp",
        "provider": "",
        "error": None,
    }
    assert datetime.fromisoformat(data["occurred_at"]) == message.delivered_at
    accepted = Callback.objects.get(message=message, event="accepted").payload["data"]
    assert accepted["previous_state"] is None and accepted["sequence"] == 1
    assert len(set(Callback.objects.values_list("webhook_id", flat=True))) == 4


def test_a_rolled_back_transition_leaves_no_callback_and_no_number(client_key):
    client = client_key[0]
    endpoint(client)
    message = create(client)
    with pytest.raises(RuntimeError), transaction.atomic():
        message_transition(message_id=message.pk, to_state=S.DISPATCHED, source=EventSource.WORKER)
        assert sent(message) == [("accepted", 1), ("dispatched", 2)]  # written with the transition
        raise RuntimeError("the caller's transaction fails after the transition")
    assert sent(message) == [("accepted", 1)]
    message.refresh_from_db()
    assert (message.state, message.event_sequence) == ("accepted", 1)
    message_transition(message_id=message.pk, to_state=S.DISPATCHED, source=EventSource.WORKER)
    assert sent(message) == [("accepted", 1), ("dispatched", 2)]


@pytest.mark.django_db(transaction=True)
def test_delivery_is_kicked_once_per_committed_transaction(client_key, kicks):
    client = client_key[0]
    endpoint(client)
    messages = [create(client) for _ in range(3)]
    assert kicks == [1, 1, 1]  # each creation its own transaction
    with transaction.atomic():
        messages_transition(
            to_state=S.DISPATCHED, source=EventSource.WORKER, changes={m.pk: ("", {}) for m in messages[:2]}
        )
        message_transition(message_id=messages[2].pk, to_state=S.DISPATCHED, source=EventSource.WORKER)
        assert kicks == [1, 1, 1]  # not before the commit
    assert kicks == [1, 1, 1, 1]
    with pytest.raises(RuntimeError), transaction.atomic():
        message_transition(message_id=messages[0].pk, to_state=S.DELIVERED, source=EventSource.WEBHOOK)
        raise RuntimeError("rolled back")
    assert kicks == [1, 1, 1, 1]
    message_transition(message_id=messages[0].pk, to_state=S.DELIVERED, source=EventSource.WEBHOOK)
    assert kicks == [1, 1, 1, 1, 1]


def test_a_transition_refused_or_not_wanted_writes_nothing_and_kicks_nothing(
    client_key, kicks, django_capture_on_commit_callbacks
):
    client = client_key[0]
    message = create(client)  # no endpoint: the event is numbered all the same
    with django_capture_on_commit_callbacks(execute=True):
        message_transition(message_id=message.pk, to_state=S.DISPATCHED, source=EventSource.WORKER)
        assert not message_transition(message_id=message.pk, to_state=S.ACCEPTED, source=EventSource.WORKER)
    message.refresh_from_db()
    assert message.event_sequence == 2 and not Callback.objects.exists() and kicks == []


def test_an_endpoints_events_filter_it_sees_increasing_numbers_with_gaps(client_key):
    client = client_key[0]
    everything = endpoint(client, "https://hooks.example.com/all")
    finals = endpoint(client, "https://hooks.example.com/finals", events=["delivered", "read"])
    message = create(client)
    lifecycle(message)
    assert sent(message, everything) == [("accepted", 1), ("dispatched", 2), ("delivered", 3), ("read", 4)]
    assert sent(message, finals) == [("delivered", 3), ("read", 4)]


def test_an_endpoint_created_after_the_message_gets_its_later_events(client_key):
    client = client_key[0]
    message = create(client)
    message_transition(message_id=message.pk, to_state=S.DISPATCHED, source=EventSource.WORKER)
    endpoint(client)
    message_transition(message_id=message.pk, to_state=S.DELIVERED, source=EventSource.WEBHOOK)
    assert sent(message) == [("delivered", 3)]


def test_disabled_endpoints_and_other_clients_endpoints_get_nothing(client_key):
    client, other = client_key[0], ApiClient.objects.create(name="globex")
    mine = endpoint(client)
    endpoint(client, "https://hooks.example.com/off", enabled=False)
    endpoint(other, "https://hooks.example.com/globex")
    message = create(client)
    lifecycle(message)
    assert set(Callback.objects.values_list("endpoint_id", flat=True)) == {mine.pk}


def test_a_messages_callback_url_replaces_the_clients_endpoints(client_key):
    client = client_key[0]
    clientwide = endpoint(client)
    message = create(client, callback_url="https://app.example.com/status/1")
    own = CallbackEndpoint.objects.get(url="https://app.example.com/status/1")
    assert message.callback_endpoint_id == own.pk and message.callback_events is None
    assert own.per_message and own.enabled and own.client == client and own.events == []
    [secret] = own.secrets
    assert secret["secret"].startswith("whsec_") and len(secret["secret"]) == len("whsec_") + 44  # base64 of 32 bytes
    assert secret["expires_at"] is None
    lifecycle(message)
    assert sent(message, own) == [("accepted", 1), ("dispatched", 2), ("delivered", 3), ("read", 4)]
    assert sent(message, clientwide) == []
    # The next message naming it uses the same endpoint (same secret); a client-wide message
    # does not report to a per-message endpoint.
    again = create(client, callback_url="https://app.example.com/status/1", callback_events=["read"])
    plain = create(client)
    assert again.callback_endpoint_id == own.pk and CallbackEndpoint.objects.count() == 2
    lifecycle(again)
    assert sent(again) == [("read", 4)]
    assert set(Callback.objects.filter(message=plain).values_list("endpoint_id", flat=True)) == {clientwide.pk}


def test_a_callback_url_of_a_disabled_endpoint_gets_nothing(client_key):
    client = client_key[0]
    endpoint(client, "https://app.example.com/status", enabled=False)
    message = create(client, callback_url="https://app.example.com/status")
    lifecycle(message)
    assert sent(message) == []
    message.refresh_from_db()
    assert message.event_sequence == 4


def test_a_batch_registers_each_callback_url_once(client_key):
    client = client_key[0]
    urls = ["https://a.example.com/s", "https://b.example.com/s", "https://a.example.com/s", None]
    items = [
        BatchItem({**SMS, "to": f"+1415555{i:04d}", **({"callback_url": u} if u else {})}) for i, u in enumerate(urls)
    ]
    messages = [result.message for result in messages_create_many(client=client, items=items)]
    assert CallbackEndpoint.objects.filter(per_message=True).count() == 2
    assert messages[0].callback_endpoint_id == messages[2].callback_endpoint_id != messages[1].callback_endpoint_id
    assert messages[3].callback_endpoint_id is None
    assert Callback.objects.count() == 3  # each accepted, to its own URL; the fourth has no endpoint


def test_a_replay_back_to_accepted_is_an_event_too(client_key):
    client = client_key[0]
    endpoint(client)
    message = create(client)
    message_transition(
        message_id=message.pk,
        to_state=S.FAILED,
        source=EventSource.WORKER,
        fields={
            "last_error_type": "invalid_recipient",
            "last_error_code": "21211",
            "last_error_message": "bad +14155552671",
        },
    )
    message_transition(message_id=message.pk, to_state=S.ACCEPTED, source=EventSource.COMMAND)
    assert sent(message) == [("accepted", 1), ("failed", 2), ("accepted", 3)]
    failed = Callback.objects.get(message=message, event="failed").payload["data"]
    assert failed["error"]["type"] == "invalid_recipient" and failed["error"]["code"] == "21211"
    assert "14155552671" not in failed["error"]["message"]  # scrubbed as in the logs
    replayed = Callback.objects.get(message=message, sequence=3).payload["data"]
    assert (replayed["previous_state"], replayed["state"], replayed["error"]) == ("failed", "accepted", None)


# --- attempt.failed -------------------------------------------------------------------------------
@pytest.fixture
def twilio_only(settings):
    """One provider for SMS: an error ends the route (no fallback hop in between)."""
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio"], "whatsapp": ["twilio"], "email": ["smtp"]},
    }


def test_a_failed_send_attempt_is_reported_before_the_failure_it_causes(sandbox, twilio_only, client_key):
    client = client_key[0]
    endpoint(client)
    message = create(client, to="+1234")  # the sandbox refuses it with 21211: a permanent error
    messages_dispatch(message_ids=[str(message.pk)])
    assert sent(message) == [("accepted", 1), ("attempt.failed", 2), ("failed", 3)]
    data = Callback.objects.get(message=message, event="attempt.failed").payload["data"]
    assert data["attempt"] == {"number": 1, "provider": "twilio", "outcome": "permanent_error"}
    assert data["state"] == "accepted" and "previous_state" not in data
    assert data["error"]["type"] == "invalid_recipient" and data["error"]["code"] == "21211"
    assert Callback.objects.get(message=message, event="attempt.failed").payload["type"] == "message.attempt.failed"


def test_a_transient_error_is_reported_and_the_retry_keeps_counting(sandbox, twilio_only, client_key):
    client = client_key[0]
    endpoint(client, events=["attempt.failed"])
    message = create(client)
    sandbox.faults(error_rate=1.0)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "accepted" and message.next_attempt_at is not None
    assert sent(message) == [("attempt.failed", 2)]
    data = Callback.objects.get(message=message).payload["data"]
    assert data["attempt"]["outcome"] == "transient_error" and data["error"]["type"]


def test_attempt_failed_without_endpoints_only_counts(make_message):
    message = make_message()
    attempt = DispatchAttempt.objects.create(
        message=message, number=1, send_generation=1, provider="twilio", channel="sms", started_at=timezone.now()
    )
    with CaptureQueriesContext(connection) as queries:
        attempt_finish_failed(
            attempt=attempt,
            started=time.monotonic(),
            outcome=AttemptOutcome.AMBIGUOUS,
            error_type="provider_timeout",
            error_code="",
            error_message="timed out",
        )
    message.refresh_from_db()
    attempt.refresh_from_db()
    assert message.event_sequence == 1 and attempt.outcome == "ambiguous" and not Callback.objects.exists()
    statements = [q["sql"] for q in queries if "SAVEPOINT" not in q["sql"]]
    assert len(statements) == 2, statements  # the count (no endpoint: nothing more), the attempt


@pytest.mark.django_db(transaction=True)
def test_attempt_failed_waits_for_a_transition_holding_the_row_and_takes_the_next_number(client_key, other_session):
    """The dispatch path holds no row lock: its increment must not reuse a number a concurrent
    transition is writing (the unique (message, endpoint, sequence) constraint would fire)."""
    client = client_key[0]
    endpoint(client)
    message = create(client)
    session = other_session()  # another worker's transaction, in the middle of a transition
    session.execute("SELECT 1 FROM messaging_message WHERE id = %s FOR UPDATE", [message.pk])
    done = threading.Event()

    def fail_an_attempt():
        try:
            with transaction.atomic():
                callbacks_attempt_failed(
                    message_id=message.pk,
                    number=1,
                    provider="twilio",
                    outcome="transient_error",
                    error={"error_type": "provider_unavailable", "error_code": "503", "error_message": "down"},
                    at=timezone.now(),
                )
        finally:
            connection.close()
            done.set()

    thread = threading.Thread(target=fail_an_attempt)
    thread.start()
    assert not done.wait(0.5), "the increment did not wait for the row lock"
    session.execute("UPDATE messaging_message SET event_sequence = event_sequence + 1 WHERE id = %s", [message.pk])
    session.commit()
    thread.join(10)
    assert done.is_set()
    message.refresh_from_db()
    assert message.event_sequence == 3
    assert Callback.objects.get(message=message, event="attempt.failed").sequence == 3


# --- cost -----------------------------------------------------------------------------------------
def _accepted(client: ApiClient, count: int) -> list[Message]:
    items = [BatchItem({**SMS, "priority": "bulk", "to": f"+1415555{i:04d}"}) for i in range(count)]
    return [result.message for result in messages_create_many(client=client, items=items)]


def _statements_to_dispatch(messages: list[Message]) -> list[str]:
    with CaptureQueriesContext(connection) as queries:
        applied = messages_transition(
            to_state=S.DISPATCHED,
            source=EventSource.WORKER,
            changes={m.pk: ("accepted", {"provider": "twilio"}) for m in messages},
        )
    assert len(applied) == len(messages)
    return [query["sql"] for query in queries if query["sql"] not in ("BEGIN", "COMMIT")]


# Committed, so that the flush takes the thousand rows away: rolled back, they would stay as bloat
# in the accepted-message indexes, which other tests' plans are sensitive to (test_sweeper).
@pytest.mark.django_db(transaction=True)
def test_a_batch_of_500_transitions_writes_its_callbacks_in_a_constant_number_of_statements(client_key):
    client = client_key[0]
    endpoint(client, "https://hooks.example.com/1")
    endpoint(client, "https://hooks.example.com/2", events=["dispatched"])
    few = _statements_to_dispatch(_accepted(client, 3))
    many = _statements_to_dispatch(_accepted(client, 500))
    assert len(many) == len(few) <= 5, "\n".join(sql[:120] for sql in many)
    assert Callback.objects.filter(event="dispatched").count() == 2 * 503
    assert Callback.objects.filter(event="accepted").count() == 503  # the second endpoint wants dispatched only
    sequences = set(Callback.objects.filter(event="dispatched").values_list("sequence", flat=True))
    assert sequences == {2}


@pytest.mark.django_db(transaction=True)
def test_without_endpoints_a_transition_costs_no_statement_more(client_key):
    client = client_key[0]
    ApiClient.objects.create(name="globex").callback_endpoints.create(url="https://hooks.example.com/g")
    statements = _statements_to_dispatch(_accepted(client, 500))
    assert len(statements) == 3, "\n".join(sql[:120] for sql in statements)  # lock and read, update, events
    assert not any(
        sql.startswith(('COPY "messaging_callback"', 'SELECT "messaging_callbackendpoint"')) for sql in statements
    )
    assert not Callback.objects.exists()


# --- the API --------------------------------------------------------------------------------------
def post(api, data: dict):
    return api.post("/api/v1/messages/", data=json.dumps(data), content_type="application/json")


def test_the_api_takes_a_callback_url_and_events(api, client_key):
    response = post(api, {**SMS, "callback_url": " https://app.example.com/s ", "callback_events": ["delivered"]})
    assert response.status_code == 201, response.content
    message = Message.objects.get(pk=response.json()["id"])
    assert message.callback_endpoint.url == "https://app.example.com/s"
    assert message.callback_events == ["delivered"]


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"callback_url": "ftp://app.example.com/s"}, "callback_url", "valid absolute URL"),
        ({"callback_url": "not a url"}, "callback_url", "valid absolute URL"),
        ({"callback_url": "https://" + "a" * 2000 + ".com/"}, "callback_url", "2000 characters"),
        ({"callback_url": ""}, "callback_url", "blank"),
        (
            {"callback_url": "https://a.example.com/", "callback_events": ["delivered", "bounced"]},
            "callback_events",
            "bounced",
        ),
        ({"callback_url": "https://a.example.com/", "callback_events": []}, "callback_events", "empty"),
        ({"callback_url": "https://a.example.com/", "callback_events": "delivered"}, "callback_events", "list"),
        ({"callback_events": ["delivered"]}, "callback_events", "callback_url too"),
    ],
)
def test_the_api_names_a_bad_callback_field(api, change, field, words):
    response = post(api, {**SMS, **change})
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {field}, errors
    assert words in json.dumps(errors[field]), errors
    assert not Message.objects.exists() and not CallbackEndpoint.objects.exists()


def test_plain_http_is_for_the_sandbox_only(api, settings):
    assert post(api, {**SMS, "callback_url": "http://127.0.0.1:9000/hook"}).status_code == 201
    settings.CONDUCTOR_MODE, settings.DEBUG = "production", False
    response = post(api, {**SMS, "callback_url": "http://127.0.0.1:9000/other"})
    assert response.status_code == 400 and "https://" in response.json()["callback_url"][0]
    assert post(api, {**SMS, "callback_url": "https://hooks.example.com/x"}).status_code == 201


@pytest.mark.parametrize(
    "url", ["https://10.0.0.5/x", "https://localhost/x", "https://[::1]:8443/x", "https://169.254.169.254/latest"]
)
def test_in_production_a_callback_url_inside_our_network_is_refused_naming_the_field(api, settings, url):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "CALLBACK_ALLOW_PRIVATE_NETWORKS": False}
    response = post(api, {**SMS, "callback_url": url})
    assert response.status_code == 400, response.content
    assert set(response.json()) == {"callback_url"} and "production" in response.json()["callback_url"][0]
    endpoint = api.post("/api/v1/callback-endpoints/", {"url": url}, format="json")
    assert endpoint.status_code == 400 and set(endpoint.json()) == {"url"}, endpoint.content
    assert post(api, {**SMS, "callback_url": "https://hooks.example.com/x"}).status_code == 201
    assert not CallbackEndpoint.objects.filter(url=url).exists()


def test_the_callback_fields_are_part_of_the_idempotent_request(api):
    first = {**SMS, "idempotency_key": "k1", "callback_url": "https://app.example.com/s"}
    assert post(api, first).status_code == 201
    assert post(api, first).status_code == 200
    assert post(api, {**first, "callback_url": "https://app.example.com/t"}).status_code == 422
    assert post(api, {**first, "callback_events": ["read"]}).status_code == 422


def test_a_batch_item_with_a_bad_callback_url_is_its_own_400(api):
    items = [{**SMS, "callback_url": "https://app.example.com/s"}, {**SMS, "callback_url": "mailto:x@example.com"}]
    response = api.post(
        "/api/v1/messages/batch/", data=json.dumps({"messages": items}), content_type="application/json"
    )
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 400]
    assert set(results[1]["errors"]) == {"callback_url"}


CALLBACK_INPUTS = [
    {**SMS, "callback_url": "https://app.example.com/s"},
    {**SMS, "callback_url": " https://app.example.com/s?x=1 ", "callback_events": ["read", "delivered", "read"]},
    {**SMS, "callback_url": "https://app.example.com/s", "callback_events": ["attempt.failed"]},
    {**SMS, "callback_url": "http://127.0.0.1:8000/s"},
    {**SMS, "callback_url": "https://app.example.com/s", "callback_events": ["nope"]},
    {**SMS, "callback_url": "https://app.example.com/s", "callback_events": [1]},
    {**SMS, "callback_url": "https://app.example.com/s", "callback_events": []},
    {**SMS, "callback_events": ["read"]},
    {**SMS, "callback_url": "ftp://x.example.com/"},
    {**SMS, "callback_url": 7},
]


@pytest.mark.parametrize("data", CALLBACK_INPUTS, ids=range(len(CALLBACK_INPUTS)))
def test_the_fast_validation_of_callback_fields_gives_the_serializers_result(data):
    serializer = MessageCreateSerializer(data=data)
    expected = (dict(serializer.validated_data), None) if serializer.is_valid() else (None, serializer.errors)
    assert message_create_validate(data) == expected


def test_a_campaign_naming_its_callback_url_keeps_the_fast_path():
    assert _fast_validated(CALLBACK_INPUTS[1])["callback_events"] == ["read", "delivered"]
    assert _fast_validated(CALLBACK_INPUTS[0]) is not None


def test_the_accepted_callback_is_written_with_the_messages(client_key):
    client = client_key[0]
    endpoint(client, events=["accepted"])
    messages = _accepted(client, 20)
    assert Callback.objects.filter(event="accepted", sequence=1).count() == 20
    assert all(m.event_sequence == 1 for m in Message.objects.filter(pk__in=[m.pk for m in messages]))
    expires = Callback.objects.first().created_at + timedelta(seconds=1)
    assert Callback.objects.filter(next_attempt_at__lt=expires).count() == 20


def test_the_outbox_writes_every_column_of_a_callback():
    from messaging.callbacks.outbox import _CALLBACK_COLUMNS

    assert set(_CALLBACK_COLUMNS) == {field.attname for field in Callback._meta.concrete_fields} - {"id"}
