"""Dead callbacks: parked as dead letters of kind "callback", listed and filtered like the others,
replayed by the same service through its three doors (command, API, admin) with a dry run,
removed by the same retention."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.urls import reverse
from django.utils import timezone

from messaging.callbacks.dead_letters import callback_error_type, callbacks_park
from messaging.callbacks.trigger import callbacks_kick
from messaging.models import Callback, DeadLetter, EventSource
from messaging.replay import dead_letters_replay
from messaging.selectors import DeadLetterCriteria, dead_letters_matching
from reconciliation.retention import dead_letters_purge_expired
from tests.support.callback_rows import callback_make, endpoint_make

pytestmark = pytest.mark.django_db

TIMEOUT = {"at": "2026-12-01T10:00:00Z", "status": None, "error": "ReadTimeout: timed out", "latency_ms": 10000}
REFUSED = {"at": "2026-12-01T10:00:05Z", "status": 410, "error": "", "latency_ms": 12}


@pytest.fixture
def endpoint(client_key):
    return endpoint_make(client_key[0])


@pytest.fixture
def dead_callback(make_message, endpoint):
    """Park one callback that timed out and was then refused for good."""

    def make(sequence=1, message=None, **fields):
        message = message or make_message(category="otp")
        callback = callback_make(
            message, endpoint, sequence=sequence, attempt_log=[TIMEOUT, REFUSED], last_error="410 Gone", **fields
        )
        assert callbacks_park(callback_ids=[callback.pk], reason="refused: 410", now=timezone.now()) == 1
        return DeadLetter.objects.get(callback=callback)

    return make


@pytest.mark.parametrize(
    "attempt, error_type",
    [
        (None, "unknown"),
        (TIMEOUT, "provider_timeout"),
        ({"status": None, "error": "ConnectionError: refused"}, "connection_error"),
        ({"status": 503}, "provider_5xx"),
        ({"status": 409}, "provider_5xx"),
        ({"status": 408}, "provider_timeout"),
        ({"status": 429}, "rate_limited"),
        ({"status": 404}, "rejected"),
        ({"status": 301}, "rejected"),
    ],
)
def test_the_last_attempt_says_the_error_type(attempt, error_type):
    assert callback_error_type(attempt) == error_type


def test_parking_records_the_callback_with_its_messages_context(dead_callback, endpoint):
    dead = dead_callback()
    callback = dead.callback
    assert (callback.state, callback.lease_expires_at) == ("dead_lettered", None)
    assert callback.dead_lettered_at == dead.created_at
    message = callback.message
    assert (dead.kind, dead.message_id, dead.client_id) == ("callback", message.pk, message.client_id)
    assert (dead.channel, dead.priority, dead.category, dead.state) == ("sms", "critical", "otp", "accepted")
    assert (dead.error_type, dead.error_code, dead.error_message) == ("rejected", "410", "410 Gone")
    assert (dead.reason, dead.provider, dead.unknown_outcome) == ("refused: 410", "", False)
    assert dead.payload == callback.payload and dead.attempts == [TIMEOUT, REFUSED]
    assert "callback" in str(dead)


def test_only_pending_callbacks_are_parked_and_each_once(make_message, endpoint):
    message = make_message()
    pending = callback_make(message, endpoint, sequence=1)
    delivered = callback_make(message, endpoint, sequence=2, state="delivered")
    now = timezone.now()
    assert callbacks_park(callback_ids=[pending.pk, delivered.pk], reason="window spent", now=now) == 1
    assert callbacks_park(callback_ids=[pending.pk], reason="again", now=now) == 0
    assert callbacks_park(callback_ids=[], reason="nothing", now=now) == 0
    assert DeadLetter.objects.filter(kind="callback").count() == 1
    delivered.refresh_from_db()
    assert delivered.state == "delivered"


def test_a_replay_makes_it_pending_again_with_a_fresh_window_and_the_same_webhook_id(
    dead_callback, django_capture_on_commit_callbacks
):
    dead = dead_callback()
    webhook_id = dead.callback.webhook_id
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=False) as kicks:
        report = dead_letters_replay(selection=DeadLetter.objects.filter(pk=dead.pk), actor="ops", via="command")
    assert (report.replayed, dict(report.replayed_by_kind)) == (1, {"callback": 1})
    assert report.callback_ids == [dead.callback_id] and report.message_ids == []
    assert callbacks_kick in kicks  # delivery is kicked once the replay is committed
    callback = Callback.objects.get(pk=dead.callback_id)
    assert (callback.state, callback.attempts, callback.webhook_id, callback.last_error) == (
        "pending",
        0,
        webhook_id,
        "",
    )
    assert callback.retry_from >= before and callback.next_attempt_at == callback.retry_from
    assert callback.created_at < callback.retry_from and callback.dead_lettered_at is None
    assert callback.attempt_log == [TIMEOUT, REFUSED]  # the history stays
    dead.refresh_from_db()
    assert (dead.replayed_by, dead.replayed_via, dead.replay_id) == ("ops", "command", report.replay_id)

    again = dead_letters_replay(selection=DeadLetter.objects.filter(pk=dead.pk), actor="ops", via="command")
    assert (again.replayed, dict(again.skipped)) == (0, {"already_replayed": 1})
    # Parked again later, it is a new dead letter of the same callback.
    assert callbacks_park(callback_ids=[callback.pk], reason="window spent", now=timezone.now()) == 1
    assert DeadLetter.objects.filter(callback=callback).count() == 2


def test_a_dry_run_changes_nothing(dead_callback):
    dead = dead_callback()
    report = dead_letters_replay(selection=DeadLetter.objects.all(), actor="ops", via="api", dry_run=True)
    assert (report.replayed, report.callback_ids) == (1, [dead.callback_id])
    assert Callback.objects.get(pk=dead.callback_id).state == "dead_lettered"
    assert DeadLetter.objects.get(pk=dead.pk).replayed_at is None


def test_a_callback_to_a_disabled_endpoint_waits_for_it_to_be_enabled(dead_callback, endpoint):
    dead = dead_callback()
    endpoint.__class__.objects.filter(pk=endpoint.pk).update(enabled=False)
    report = dead_letters_replay(selection=DeadLetter.objects.all(), actor="ops", via="admin", force=True)
    assert (report.replayed, dict(report.skipped)) == (0, {"endpoint_disabled": 1})
    assert DeadLetter.objects.get(pk=dead.pk).replayed_at is None


def test_a_replay_of_both_kinds_counts_each(dead_callback, park):
    dead_callback()
    park()
    report = dead_letters_replay(selection=DeadLetter.objects.all(), actor="ops", via="command")
    assert report.as_dict()["replayed_by_kind"] == {"message": 1, "callback": 1}
    assert report.replayed == 2 and len(report.message_ids) == 1 and len(report.callback_ids) == 1


def test_filters_select_by_kind_endpoint_and_the_messages_own_fields(dead_callback, park, client_key):
    dead = dead_callback()
    message_dead = park(category="otp")
    other = endpoint_make(client_key[0], url="https://hooks.example.com/other")
    elsewhere = callback_make(message_dead.message, other, sequence=5)
    callbacks_park(callback_ids=[elsewhere.pk], reason="endpoint_disabled", now=timezone.now())

    def ids(**criteria):
        return set(dead_letters_matching(criteria=DeadLetterCriteria(**criteria)).values_list("pk", flat=True))

    callbacks = {dead.pk, DeadLetter.objects.get(callback=elsewhere).pk}
    assert ids(kinds=("callback",)) == callbacks
    assert ids(kinds=("message",)) == {message_dead.pk}
    assert ids(endpoints=(other.pk,)) == {DeadLetter.objects.get(callback=elsewhere).pk}
    assert ids(kinds=("callback",), categories=("otp",)) == callbacks
    assert DeadLetterCriteria(kinds=("callback",)).narrows()


def test_the_command_replays_callbacks_by_kind_and_endpoint_with_a_dry_run(dead_callback, park, endpoint):
    dead = dead_callback()
    message_dead = park()
    out = io.StringIO()
    call_command("replay_dead_letters", "--kind", "callback", "--dry-run", stdout=out)
    text = out.getvalue()
    assert "Matched 1 parked dead letter." in text and "by kind: callback 1" in text
    assert "Dry run: 1 would be replayed" in text
    assert Callback.objects.get(pk=dead.callback_id).state == "dead_lettered"

    out = io.StringIO()
    call_command("replay_dead_letters", "--endpoint", str(endpoint.pk), "--json", stdout=out)
    report = json.loads(out.getvalue())
    assert report["replayed_by_kind"] == {"message": 0, "callback": 1} and report["callback_ids"] == [dead.callback_id]
    assert Callback.objects.get(pk=dead.callback_id).state == "pending"
    assert DeadLetter.objects.get(pk=message_dead.pk).replayed_at is None  # not selected
    assert DeadLetter.objects.get(pk=dead.pk).replayed_via == EventSource.COMMAND


def test_the_command_says_what_to_do_with_a_disabled_endpoint(dead_callback, endpoint):
    dead_callback()
    endpoint.__class__.objects.filter(pk=endpoint.pk).update(enabled=False)
    out = io.StringIO()
    call_command("replay_dead_letters", "--kind", "callback", stdout=out)
    assert "1 endpoint disabled" in out.getvalue() and "Enable the skipped callbacks' endpoints first" in out.getvalue()


def test_the_api_lists_filters_and_replays_the_clients_dead_callbacks(api, other_api, dead_callback, park):
    dead = dead_callback()
    park()
    listed = api.get("/api/v1/dead-letters/", {"kind": "callback"}).json()["results"]
    assert [d["id"] for d in listed] == [dead.pk]
    assert listed[0]["kind"] == "callback" and listed[0]["callback"]["webhook_id"] == dead.callback.webhook_id
    assert listed[0]["callback"]["endpoint_url"] == "https://hooks.example.com/conductor"
    messages = api.get("/api/v1/dead-letters/", {"kind": "message"}).json()["results"]
    assert [d["kind"] for d in messages] == ["message"] and messages[0]["callback"] is None
    detail = api.get(f"/api/v1/dead-letters/{dead.pk}/").json()
    assert detail["payload"]["type"] == "message.accepted" and detail["attempts"] == [TIMEOUT, REFUSED]
    assert api.get("/api/v1/dead-letters/", {"kind": "letter"}).status_code == 400

    # Another client's replay with the same filter touches nothing of this client's.
    assert other_api.post("/api/v1/dead-letters/replay/", {"kind": "callback"}, format="json").json()["matched"] == 0
    dry = api.post("/api/v1/dead-letters/replay/", {"kind": "callback", "dry_run": True}, format="json").json()
    assert (dry["matched"], dry["replayed"], dry["callback_ids"]) == (1, 1, [dead.callback_id])
    assert Callback.objects.get(pk=dead.callback_id).state == "dead_lettered"
    done = api.post(
        "/api/v1/dead-letters/replay/", {"kind": "callback", "endpoint": dead.callback.endpoint_id}, format="json"
    ).json()
    assert done["replayed_by_kind"] == {"message": 0, "callback": 1} and done["remaining"] == 0
    assert Callback.objects.get(pk=dead.callback_id).state == "pending"


def test_the_admin_replays_dead_callbacks_and_shows_them(client, dead_callback, park):
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests"))
    dead = dead_callback()
    message_dead = park()
    changelist = reverse("admin:messaging_deadletter_changelist")
    page = client.get(changelist, {"kind__exact": "callback"}).content.decode()
    assert str(dead.message_id) in page and str(message_dead.message_id) not in page
    detail = client.get(reverse("admin:messaging_deadletter_change", args=[dead.pk])).content.decode()
    assert (
        "ReadTimeout: timed out" in detail
        and reverse("admin:messaging_callback_change", args=[dead.callback_id]) in detail
    )
    response = client.post(changelist, {"action": "replay_selected", "_selected_action": [dead.pk]}, follow=True)
    assert "Replayed 1" in response.content.decode()
    dead.refresh_from_db()
    assert dead.replayed_via == "admin" and Callback.objects.get(pk=dead.callback_id).state == "pending"


def test_retention_removes_dead_callbacks_with_their_messages_policy(dead_callback):
    dead = dead_callback()  # critical: kept a day by default
    assert dead_letters_purge_expired().total == 0
    report = dead_letters_purge_expired(now=timezone.now() + timedelta(days=2))
    assert report.total == 1 and not DeadLetter.objects.filter(pk=dead.pk).exists()
    assert Callback.objects.get(pk=dead.callback_id).state == "dead_lettered"  # the outbox row stays


def test_the_message_detail_shows_its_callbacks_with_their_attempts(api, make_message, endpoint, client_key):
    message = make_message()
    callback_make(message, endpoint, sequence=2, event="dispatched", attempt_log=[TIMEOUT])
    callback_make(message, endpoint, sequence=1, state="delivered", delivered_at=timezone.now())
    body = api.get(f"/api/v1/messages/{message.pk}/").json()
    assert [(c["sequence"], c["event"], c["state"]) for c in body["callbacks"]] == [
        (1, "accepted", "delivered"),
        (2, "dispatched", "pending"),
    ]
    second = body["callbacks"][1]
    assert second["endpoint_url"] == endpoint.url and second["endpoint_id"] == endpoint.pk
    assert second["webhook_id"].startswith("msg_") and second["attempts"] == 1
    assert second["attempt_log"] == [TIMEOUT]
    assert body["callbacks"][0]["delivered_at"] is not None
