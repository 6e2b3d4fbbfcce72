"""Quiet hours at acceptance (API, single and batch) and at dispatch: a message inside its recipient's
window is not published or sent, and waits with next_attempt_at at the window's end; deadlines win."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.api.serializers import MessageCreateSerializer, _fast_validated, message_create_validate
from messaging.dispatch import messages_dispatch
from messaging.models import Message
from messaging.sweeper import messages_sweep

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/"
BATCH_URL = "/api/v1/messages/batch/"
LONDON_LANDLINE = "+442071838750"  # phonenumbers: Europe/London only
SMS = {"channel": "sms", "to": "+14155552671", "body": "20% off today", "priority": "bulk", "category": "promo"}


def window_around_now(zone: str, *, before=timedelta(hours=1), after=timedelta(hours=2)) -> tuple[dict, datetime]:
    """A window holding the current time in `zone`, and the instant it ends (next time the clock shows its end)."""
    now = timezone.now().astimezone(ZoneInfo(zone))
    start, end = (now - before).strftime("%H:%M"), (now + after).strftime("%H:%M")
    end_local = (now + after).replace(second=0, microsecond=0)
    return {"start": start, "end": end}, end_local.astimezone(UTC)


def quiet_everywhere_now(settings, zone: str = "UTC", **window_extra) -> datetime:
    window, ends = window_around_now(zone)
    settings.CONDUCTOR = {**settings.CONDUCTOR, "QUIET_HOURS": {"default": {**window, **window_extra}}}
    return ends


@pytest.fixture
def published(monkeypatch) -> list:
    """Everything acceptance published, one by one or together."""
    calls: list = []
    monkeypatch.setattr("messaging.ingest.messages_publish", lambda *, messages: calls.extend(messages))
    monkeypatch.setattr(
        "messaging.ingest.message_publish",
        lambda *, message_id, channel, priority, countdown=None: calls.append(message_id),
    )
    return calls


def post(api, data, url=URL):
    return api.post(url, data=json.dumps(data), content_type="application/json")


# --- the timezone field --------------------------------------------------------------------------


def test_a_given_timezone_is_stored_and_shown(api):
    response = post(api, {**SMS, "timezone": "Asia/Kolkata"})
    assert response.status_code == 201, response.content
    assert response.json()["timezone"] == "Asia/Kolkata"
    assert Message.objects.get().recipient_timezone == "Asia/Kolkata"
    assert api.get(f"{URL}{response.json()['id']}/").json()["timezone"] == "Asia/Kolkata"
    without = post(api, SMS).json()
    assert without["timezone"] == ""


@pytest.mark.parametrize("name", ["Mars/Olympus_Mons", "europe/london", "", "x" * 65, 7])
def test_a_bad_timezone_is_400_naming_it(api, name):
    response = post(api, {**SMS, "timezone": name})
    if name == "":
        assert response.status_code == 201  # blank: from the number
        return
    assert response.status_code == 400 and "timezone" in response.json(), response.content
    assert Message.objects.count() == 0


def test_the_batch_fast_path_takes_a_timezone_and_refuses_a_bad_one_as_the_serializer_does(api):
    good, bad = {**SMS, "timezone": "Europe/London"}, {**SMS, "timezone": "Nowhere/City"}
    serializer = MessageCreateSerializer(data=good)
    assert serializer.is_valid()
    assert message_create_validate(good) == (dict(serializer.validated_data), None)
    assert _fast_validated(good)["timezone"] == "Europe/London"
    assert _fast_validated(bad) is None
    assert message_create_validate(bad)[1].keys() == {"timezone"}
    body = post(api, {"messages": [good, bad]}, BATCH_URL).json()
    assert [r["status"] for r in body["results"]] == [201, 400]
    assert body["results"][0]["message"]["timezone"] == "Europe/London"
    assert "timezone" in body["results"][1]["errors"]


# --- acceptance -----------------------------------------------------------------------------------


def test_a_message_accepted_in_quiet_hours_is_not_published_and_waits_for_the_end(
    api, settings, published, django_capture_on_commit_callbacks
):
    ends = quiet_everywhere_now(settings, "Europe/London")
    with django_capture_on_commit_callbacks(execute=True):
        response = post(api, {**SMS, "to": LONDON_LANDLINE})  # the zone from the number
    assert response.status_code == 201, response.content
    assert published == []
    message = Message.objects.get()
    assert message.next_attempt_at == ends and message.enqueued_at is None
    assert response.json()["next_attempt_at"] is not None
    # A number in another zone (New York: quiet hours are London's 3 hours around now, so not there).
    with django_capture_on_commit_callbacks(execute=True):
        post(api, {**SMS, "to": "+12125551234"})
    assert len(published) == 1


def test_the_batch_path_holds_the_same_messages(api, settings, published, django_capture_on_commit_callbacks):
    ends = quiet_everywhere_now(settings, "Asia/Kolkata")
    items = [
        {**SMS, "to": "+919876543210"},  # India: quiet
        {**SMS, "to": "+919876543211", "priority": "critical"},  # critical: exempt
        {**SMS, "channel": "email", "to": "a@example.com"},  # email, no zone: not held
        {**SMS, "channel": "email", "to": "b@example.com", "timezone": "Asia/Kolkata"},  # given: held
        {**SMS, "to": "+919876543212", "ordering_key": "k"},  # one by one: held too
    ]
    with django_capture_on_commit_callbacks(execute=True):
        body = post(api, {"messages": items}, BATCH_URL).json()
    assert [r["status"] for r in body["results"]] == [201] * 5
    ids = [r["message"]["id"] for r in body["results"]]
    rows = {str(m.pk): m for m in Message.objects.all()}
    held = [i for i in ids if rows[i].next_attempt_at is not None]
    assert held == [ids[0], ids[3], ids[4]]
    assert all(rows[i].next_attempt_at == ends and rows[i].enqueued_at is None for i in held)
    assert sorted(str(p[0]) if isinstance(p, tuple) else str(p) for p in published) == sorted([ids[1], ids[2]])


def test_critical_waits_when_the_window_includes_it(api, settings, published, django_capture_on_commit_callbacks):
    quiet_everywhere_now(settings, exempt_priorities=[])
    with django_capture_on_commit_callbacks(execute=True):
        post(api, {**SMS, "priority": "critical", "timezone": "UTC"})
    assert published == [] and Message.objects.get().next_attempt_at is not None


def test_a_client_configuration_overrides_the_setting(api, client_key, settings, published):
    quiet_everywhere_now(settings)
    client = client_key[0]
    client.quiet_hours = {}  # this client: none
    client.save()
    post(api, {**SMS, "timezone": "UTC"})
    assert Message.objects.get().next_attempt_at is None
    settings.CONDUCTOR = {**settings.CONDUCTOR, "QUIET_HOURS": {}}
    window, ends = window_around_now("UTC")
    client.quiet_hours = {"promo": window}
    client.save()
    second = post(api, {**SMS, "timezone": "UTC"}).json()
    assert Message.objects.get(pk=second["id"]).next_attempt_at == ends
    other = post(api, {**SMS, "category": "receipts", "timezone": "UTC"}).json()  # no default: none
    assert Message.objects.get(pk=other["id"]).next_attempt_at is None


def test_a_deadline_inside_quiet_hours_expires_it_and_says_why(api, settings, published):
    ends = quiet_everywhere_now(settings)
    response = post(api, {**SMS, "timezone": "UTC", "ttl_seconds": 600})
    message = Message.objects.get(pk=response.json()["id"])
    assert message.next_attempt_at == ends and message.expires_at < ends
    assert message.last_error_message.startswith("quiet hours until")
    # Nothing sends it; the sweeper expires it at its deadline, saying quiet hours kept it.
    report = messages_sweep(now=message.expires_at + timedelta(seconds=1))
    assert report.expired == 1
    message.refresh_from_db()
    assert message.state == "expired" and message.last_error_type == "expired"
    event = message.events.order_by("created_at").last()
    assert event.detail.startswith("deadline passed in quiet hours")
    assert "expires instead of being sent" in message.last_error_message


def test_the_sweeper_publishes_a_held_message_when_the_window_ends(api, settings, monkeypatch):
    ends = quiet_everywhere_now(settings)
    message_id = post(api, {**SMS, "timezone": "UTC"}).json()["id"]
    sent: list = []
    monkeypatch.setattr("messaging.sweeper.messages_publish", lambda *, messages, alone=(): sent.extend(messages))
    messages_sweep(now=timezone.now())
    assert sent == []
    messages_sweep(now=ends + timedelta(seconds=1))
    assert [str(pk) for pk, _, _ in sent] == [message_id]


# --- dispatch -------------------------------------------------------------------------------------


def test_a_claimed_message_in_quiet_hours_is_handed_back_without_a_request(sandbox, make_message, settings):
    ends = quiet_everywhere_now(settings, "America/New_York")
    message = make_message(to="+12125551234", priority="transactional", expires_at=timezone.now() + timedelta(days=1))
    assert messages_dispatch(message_ids=[str(message.pk)]) == 0
    message.refresh_from_db()
    assert message.state == "accepted" and message.attempt_count == 0 and not message.attempts.exists()
    assert message.next_attempt_at == ends and message.enqueued_at is None and message.lease_expires_at is None
    assert sandbox.requests() == []
    # When the window has ended it goes (the claim checks again at its own now).
    settings.CONDUCTOR = {**settings.CONDUCTOR, "QUIET_HOURS": {}}
    Message.objects.filter(pk=message.pk).update(next_attempt_at=None)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched" and len(sandbox.requests()) == 1


def test_a_batch_claim_sends_the_others_and_holds_the_quiet_ones(sandbox, make_message, settings):
    quiet_everywhere_now(settings, "Europe/London")
    quiet = make_message(to=LONDON_LANDLINE, priority="bulk")
    elsewhere = make_message(to="+14155552671", priority="bulk")
    critical = make_message(to=LONDON_LANDLINE, priority="critical")
    client = quiet.client
    assert messages_dispatch(message_ids=[str(m.pk) for m in (quiet, elsewhere, critical)]) == 2
    states = dict(Message.objects.values_list("pk", "state"))
    assert states == {quiet.pk: "accepted", elsewhere.pk: "dispatched", critical.pk: "dispatched"}
    # The client's own configuration, read with the rows, wins over the setting.
    client.quiet_hours = {}
    client.save()
    Message.objects.filter(pk=quiet.pk).update(next_attempt_at=None)
    assert messages_dispatch(message_ids=[str(quiet.pk)]) == 1


def test_a_claimed_message_whose_deadline_comes_first_waits_and_says_so(sandbox, make_message, settings):
    ends = quiet_everywhere_now(settings)
    message = make_message(priority="bulk", recipient_timezone="UTC")  # expires in 5 minutes
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.next_attempt_at == ends and message.state == "accepted"
    assert "its deadline" in message.last_error_message and sandbox.requests() == []


def test_the_claim_reads_client_quiet_hours_with_the_rows(make_message, settings):
    """No query a message: the same number of statements for one held message as for ten."""
    quiet_everywhere_now(settings)

    def claim_count(n):
        ids = [str(make_message(priority="bulk", recipient_timezone="UTC", to=f"+1415555{i:04d}").pk) for i in range(n)]
        with CaptureQueriesContext(connection) as queries:
            messages_dispatch(message_ids=ids)
        return len(queries)

    assert claim_count(1) == claim_count(10)
