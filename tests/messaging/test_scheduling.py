"""Scheduled sends (send_at): validation naming the field, the deadline counted from send_at, stored
without a task and released when due (never before), cancel until due, the list filter."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.api.serializers import MessageCreateSerializer, _fast_validated, message_create_validate
from messaging.dispatch import messages_dispatch
from messaging.ingest import BatchItem, messages_create_many
from messaging.models import Message
from messaging.routing import retry_policy_for
from messaging.sweeper import messages_release_due

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/"
GOOD = {"channel": "sms", "to": "+14155552671", "body": "Your appointment is tomorrow", "priority": "transactional"}


def post(api, data):
    return api.post(URL, data=json.dumps(data), content_type="application/json")


def iso(moment) -> str:
    return moment.isoformat()


@pytest.fixture
def published(monkeypatch) -> list[tuple]:
    """Every (id, channel, priority) handed to a publish, by acceptance or by the release job."""
    calls: list[tuple] = []

    def publish_many(*, messages, alone=()):
        messages = list(messages)
        calls.extend(messages)
        return len(messages)

    def publish_one(*, message_id, channel, priority, countdown=None):
        calls.append((message_id, channel, priority))
        return True

    monkeypatch.setattr("messaging.ingest.messages_publish", publish_many)
    monkeypatch.setattr("messaging.ingest.message_publish", publish_one)
    monkeypatch.setattr("messaging.sweeper.messages_publish", publish_many)
    return calls


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"send_at": "tomorrow"}, "Datetime has wrong format"),
        ({"send_at_offset": -3600}, "in the past"),
        ({"send_at_offset": 367 * 24 * 3600}, "TTL_MAX_SECONDS"),
        ({"send_at_offset": 600, "expires_offset": 300}, "before expires_at"),
        ({"send_at_offset": 600, "expires_offset": 600}, "before expires_at"),
        ({"send_at_offset": 600, "ordering_key": "order-7"}, "ordering_key"),
    ],
)
def test_a_bad_send_at_is_a_400_naming_it_on_create_and_in_a_batch(api, published, extra, fragment):
    now = timezone.now()
    item = {**GOOD, **{k: v for k, v in extra.items() if not k.endswith("_offset")}}
    if "send_at_offset" in extra:
        item["send_at"] = iso(now + timedelta(seconds=extra["send_at_offset"]))
    if "expires_offset" in extra:
        item["expires_at"] = iso(now + timedelta(seconds=extra["expires_offset"]))
    response = post(api, item)
    assert response.status_code == 400, response.content
    assert list(response.json()) == ["send_at"]
    assert fragment in response.json()["send_at"][0]
    batch = api.post(f"{URL}batch/", data=json.dumps({"messages": [GOOD, item]}), content_type="application/json")
    results = batch.json()["results"]
    assert [r["status"] for r in results] == [201, 400]
    assert list(results[1]["errors"]) == ["send_at"]
    assert Message.objects.filter(send_at__isnull=False).count() == 0


def test_the_fast_path_takes_a_good_send_at_as_the_serializer_does():
    send_at = timezone.now() + timedelta(minutes=10)
    for text in (send_at.isoformat(), send_at.astimezone(timezone.get_fixed_timezone(120)).isoformat()):
        item = {**GOOD, "send_at": text, "ttl_seconds": 600}
        fast = _fast_validated(item)
        assert fast is not None  # a common scheduled item takes the fast path
        serializer = MessageCreateSerializer(data=item)
        assert serializer.is_valid(), serializer.errors
        slow = dict(serializer.validated_data)
        assert fast == slow and str(fast["send_at"]) == str(slow["send_at"])  # same fingerprint
    # Anything doubtful goes to the serializer, which names the error.
    assert _fast_validated({**GOOD, "send_at": 12}) is None
    fields, errors = message_create_validate({**GOOD, "send_at": 12})
    assert fields is None and list(errors) == ["send_at"]


def test_a_scheduled_message_is_stored_waiting_and_not_published(api, published, django_capture_on_commit_callbacks):
    now = timezone.now()
    send_at = now + timedelta(minutes=30)
    with django_capture_on_commit_callbacks(execute=True):
        response = post(api, {**GOOD, "send_at": iso(send_at), "ttl_seconds": 120})
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["send_at"].startswith(send_at.strftime("%Y-%m-%dT%H:%M:%S"))
    message = Message.objects.get(pk=body["id"])
    assert message.state == "accepted"
    assert message.send_at == send_at and message.next_attempt_at == send_at
    assert message.enqueued_at is None
    # The TTL counts from send_at, not from acceptance.
    assert message.expires_at == send_at + timedelta(seconds=120)
    assert published == []


def test_the_policy_ttl_counts_from_send_at_and_expires_at_is_kept(api, published):
    send_at = timezone.now() + timedelta(hours=2)
    policy_ttl = retry_policy_for("transactional", "").ttl_seconds
    first = post(api, {**GOOD, "send_at": iso(send_at)}).json()
    assert Message.objects.get(pk=first["id"]).expires_at == send_at + timedelta(seconds=policy_ttl)
    deadline = send_at + timedelta(minutes=5)
    second = post(api, {**GOOD, "send_at": iso(send_at), "expires_at": iso(deadline)}).json()
    assert Message.objects.get(pk=second["id"]).expires_at == deadline
    assert published == []


def test_a_send_at_slightly_past_is_sent_at_once(api, published, django_capture_on_commit_callbacks):
    send_at = timezone.now() - timedelta(seconds=30)
    with django_capture_on_commit_callbacks(execute=True):
        body = post(api, {**GOOD, "send_at": iso(send_at), "ttl_seconds": 60}).json()
    message = Message.objects.get(pk=body["id"])
    assert message.send_at == send_at and message.next_attempt_at is None and message.enqueued_at is not None
    assert message.expires_at > timezone.now() + timedelta(seconds=55)  # from now, not from the past send_at
    assert [str(p[0]) for p in published] == [body["id"]]


def test_a_batch_publishes_only_its_messages_due_now(api, published, django_capture_on_commit_callbacks):
    later = timezone.now() + timedelta(minutes=5)
    items = [GOOD, {**GOOD, "send_at": iso(later)}, {**GOOD, "priority": "bulk", "send_at": iso(later)}]
    with django_capture_on_commit_callbacks(execute=True):
        response = api.post(f"{URL}batch/", data=json.dumps({"messages": items}), content_type="application/json")
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 201, 201]
    assert [str(p[0]) for p in published] == [results[0]["message"]["id"]]
    waiting = Message.objects.filter(send_at=later)
    assert waiting.count() == 2 and not waiting.filter(enqueued_at__isnull=False).exists()


def test_the_release_job_publishes_what_is_due_once_and_leaves_the_rest(client_key, published):
    client = client_key[0]
    now = timezone.now()
    items = [BatchItem({**GOOD, "send_at": now + timedelta(seconds=s)}) for s in (10, 20, 3600)]
    items.append(BatchItem({**GOOD, "priority": "bulk", "send_at": now + timedelta(seconds=10)}))
    ids = [result.message.id for result in messages_create_many(client=client, items=items)]
    assert published == []
    assert messages_release_due(now=now + timedelta(seconds=5)) == 0
    assert messages_release_due(now=now + timedelta(seconds=15)) == 2
    assert sorted(str(p[0]) for p in published) == sorted(str(i) for i in (ids[0], ids[3]))
    assert messages_release_due(now=now + timedelta(seconds=16)) == 0  # marked: not twice
    assert messages_release_due(now=now + timedelta(seconds=25)) == 1
    assert Message.objects.get(pk=ids[2]).enqueued_at is None


def test_a_refused_publish_is_unmarked_for_the_next_tick(client_key, monkeypatch):
    now = timezone.now()
    [result] = messages_create_many(
        client=client_key[0], items=[BatchItem({**GOOD, "send_at": now + timedelta(seconds=10)})]
    )
    monkeypatch.setattr("messaging.sweeper.messages_publish", lambda *, messages, alone=(): 0)  # broker down
    assert messages_release_due(now=now + timedelta(seconds=11)) == 0
    assert Message.objects.get(pk=result.message.id).enqueued_at is None
    monkeypatch.setattr("messaging.sweeper.messages_publish", lambda *, messages, alone=(): len(list(messages)))
    assert messages_release_due(now=now + timedelta(seconds=12)) == 1
    assert Message.objects.get(pk=result.message.id).enqueued_at is not None


def test_never_claimed_before_send_at_despite_the_early_tolerance(make_message, monkeypatch):
    now = timezone.now()
    send_at = now + timedelta(milliseconds=500)  # within EARLY_TOLERANCE (1 s) of now
    message = make_message(send_at=send_at, next_attempt_at=send_at, enqueued_at=None)
    assert not message.is_claimable(now)
    assert not Message.objects.claimable(now).filter(pk=message.pk).exists()
    assert message.is_claimable(send_at) and Message.objects.claimable(send_at).filter(pk=message.pk).exists()
    # A retry countdown without send_at keeps its tolerance.
    retry = make_message(next_attempt_at=send_at)
    assert retry.is_claimable(now)
    monkeypatch.setattr("messaging.dispatch.timezone.now", lambda: now)
    assert messages_dispatch(message_ids=[str(message.pk)]) == 0
    assert Message.objects.get(pk=message.pk).attempt_count == 0


def test_the_fair_bulk_claim_skips_a_bulk_message_not_yet_due(make_message, settings):
    from messaging.fair import bulk_pick_fair

    now = timezone.now()
    soon = now + timedelta(milliseconds=500)
    waiting = make_message(priority="bulk", send_at=soon, next_attempt_at=soon, enqueued_at=None)
    plain = make_message(priority="bulk", to="+14155552672")
    from django.db import transaction

    with transaction.atomic():
        picked = bulk_pick_fair(channel="sms", size=10, now=now)
    assert plain.pk in picked and waiting.pk not in picked
    with transaction.atomic():
        assert waiting.pk in bulk_pick_fair(channel="sms", size=10, now=soon)


def test_cancel_works_until_due_and_the_list_filter_shows_the_waiting(api, published):
    later = timezone.now() + timedelta(minutes=10)
    scheduled = post(api, {**GOOD, "send_at": iso(later)}).json()["id"]
    other = post(api, {**GOOD, "send_at": iso(later)}).json()["id"]
    now_sent = post(api, GOOD).json()["id"]
    listed = api.get(f"{URL}?scheduled=true").json()["results"]
    assert sorted(m["id"] for m in listed) == sorted([scheduled, other])
    assert [m["id"] for m in api.get(f"{URL}?scheduled=false").json()["results"]] == [now_sent]
    response = api.post(f"{URL}{scheduled}/cancel/")
    assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert [m["id"] for m in api.get(f"{URL}?scheduled=true").json()["results"]] == [other]
    # Once released the row is no longer scheduled; released and claimed, it cannot be cancelled.
    assert messages_release_due(now=later + timedelta(seconds=1)) == 1
    Message.objects.filter(pk=other).update(lease_expires_at=timezone.now() + timedelta(seconds=30))
    assert api.post(f"{URL}{other}/cancel/").status_code == 409


def test_the_schema_describes_send_at_and_the_filter(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    create = schema["components"]["schemas"]["MessageCreate"]["properties"]["send_at"]
    assert create["format"] == "date-time" and "TTL_MAX_SECONDS" in create["description"]
    shown = schema["components"]["schemas"]["Message"]["properties"]["send_at"]
    assert shown["format"] == "date-time" and shown["readOnly"] and "not sent before" in shown["description"]
    parameters = schema["paths"]["/api/v1/messages/"]["get"]["parameters"]
    assert any(p["name"] == "scheduled" and p["schema"]["type"] == "boolean" for p in parameters)


def test_the_admin_lists_and_filters_scheduled_messages(client, make_message):
    from django.contrib.auth.models import User
    from django.urls import reverse

    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests"))
    later = timezone.now() + timedelta(hours=1)
    waiting = make_message(send_at=later, next_attempt_at=later, enqueued_at=None)
    plain = make_message()
    url = reverse("admin:messaging_message_changelist")
    shown = client.get(url, {"waiting": "scheduled"}).content.decode()
    assert str(waiting.pk) in shown and str(plain.pk) not in shown
    shown = client.get(url).content.decode()
    assert str(plain.pk) in shown and str(waiting.pk) in shown and "send_at" in shown.lower().replace(" ", "_")


def test_beat_releases_every_second_on_a_queue_of_its_own(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["messaging.release_due"]
    assert entry["schedule"] == settings.RELEASE_INTERVAL_SECONDS == 1.0
    assert entry["options"]["queue"] == settings.RELEASE_QUEUE == "release"
    assert "release" in {queue.name for queue in settings.CELERY_TASK_QUEUES}
    assert entry["options"]["queue"] != settings.MAINTENANCE_QUEUE  # never behind long maintenance jobs
