"""The dead letter API: a client lists, inspects and replays only its own dead letters."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import DeadLetter, Message

pytestmark = pytest.mark.django_db

LIST = "/api/v1/dead-letters/"
REPLAY = "/api/v1/dead-letters/replay/"


def replay(api, body):
    return api.post(REPLAY, data=json.dumps(body), content_type="application/json")


@pytest.fixture
def theirs(other_api, park):
    """A dead letter of another client (globex)."""
    from messaging.models import ApiClient

    globex = ApiClient.objects.get(name="globex")
    return park(client=globex, error_type="provider_timeout", priority="bulk")


def test_the_list_shows_the_clients_own_dead_letters_newest_first(api, park, theirs):
    older = park(error_type="provider_5xx", parked_at=timezone.now() - timedelta(hours=1))
    newer = park(error_type="invalid_recipient", state="failed", provider="vonage")
    response = api.get(LIST)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["id"] for r in results] == [newer.pk, older.pk]
    first = results[0]
    assert first["status"] == "parked" and first["state"] == "failed" and first["provider"] == "vonage"
    assert first["error"] == {"type": "invalid_recipient", "code": "", "message": "invalid_recipient in a test"}
    assert first["message_id"] == str(newer.message_id) and "payload" not in first


def test_the_list_filters_by_error_type_provider_channel_status_and_time(api, park):
    timeout = park(error_type="provider_timeout", provider="twilio")
    whatsapp = park(error_type="provider_5xx", provider="vonage", channel="whatsapp")
    replayed = park(error_type="provider_timeout", provider="vonage")
    DeadLetter.objects.filter(pk=replayed.pk).update(replayed_at=timezone.now())

    def ids(**query):
        response = api.get(LIST, query)
        assert response.status_code == 200, response.content
        return {r["id"] for r in response.json()["results"]}

    assert ids(error_type="provider_timeout") == {timeout.pk, replayed.pk}
    assert ids(error_type="provider_timeout", status="parked") == {timeout.pk}
    assert ids(provider="vonage", channel="whatsapp") == {whatsapp.pk}
    assert ids(provider="vonage") == {whatsapp.pk, replayed.pk}
    assert ids(status="replayed") == {replayed.pk}
    assert ids(created_after=(timezone.now() + timedelta(minutes=1)).isoformat()) == set()


def test_bad_filters_are_a_400_naming_the_field(api):
    response = api.get(LIST, {"error_type": "gremlins"})
    assert response.status_code == 400 and "error_type" in response.json()


def test_the_detail_has_the_payload_and_every_attempt_and_is_404_for_another_client(api, park, theirs):
    mine = park(attempts=2, body="the original text")
    body = api.get(f"{LIST}{mine.pk}/").json()
    assert body["payload"]["body"] == "the original text"
    assert [a["number"] for a in body["attempts"]] == [1, 2]
    assert api.get(f"{LIST}{theirs.pk}/").status_code == 404


def test_a_replay_needs_a_filter_or_all(api, park):
    park()
    response = replay(api, {})
    assert response.status_code == 400 and "all" in response.json()
    assert replay(api, {"dry_run": True}).status_code == 400
    assert replay(api, {"all": True, "dry_run": True}).json()["replayed"] == 1


def test_bad_replay_input_is_a_400_naming_the_field(api):
    for body, field in (
        ({"channel": "fax"}, "channel"),
        ({"error_type": "gremlins"}, "error_type"),
        ({"ids": ["not-an-id"]}, "ids"),
        ({"all": True, "limit": 0}, "limit"),
        ({"all": True, "limit": 5000}, "limit"),
        ({"all": True, "dryrun": True}, "dryrun"),
    ):
        response = replay(api, body)
        assert response.status_code == 400 and field in response.json(), (body, response.content)


def test_a_dry_run_says_how_many_would_be_replayed_and_changes_nothing(api, park):
    park(error_type="provider_timeout", priority="bulk")
    park(error_type="provider_timeout", priority="critical", expires_at=timezone.now() - timedelta(minutes=1))
    park(error_type="provider_5xx")
    body = replay(api, {"error_type": "provider_timeout", "dry_run": True}).json()
    assert (body["matched"], body["replayed"], body["skipped"]) == (2, 1, {"past_deadline": 1})
    assert body["dry_run"] is True and body["remaining"] == 0
    assert DeadLetter.objects.filter(replayed_at__isnull=True).count() == 3


def test_a_replay_replays_the_match_once_and_only_the_clients_own(api, park, theirs):
    mine = park(error_type="provider_timeout", priority="bulk")
    park(error_type="provider_5xx", priority="bulk")
    body = replay(api, {"error_type": "provider_timeout"}).json()
    assert (body["matched"], body["replayed"], body["message_ids"]) == (1, 1, [str(mine.message_id)])
    assert Message.objects.get(pk=mine.message_id).state == "accepted"
    theirs.refresh_from_db()
    assert theirs.is_parked  # same error type, another client: untouched
    mine.refresh_from_db()
    assert (mine.replayed_via, mine.replayed_by, str(mine.replay_id)) == ("api", "acme", body["replay_id"])
    again = replay(api, {"error_type": "provider_timeout"}).json()
    assert (again["matched"], again["replayed"]) == (0, 0)


def test_a_replay_by_ids_takes_dead_letter_and_message_ids(api, park, theirs):
    by_number, by_uuid, _other = park(priority="bulk"), park(priority="bulk"), park(priority="bulk")
    body = replay(api, {"ids": [by_number.pk, str(by_uuid.message_id), theirs.pk]}).json()
    assert body["replayed"] == 2 and set(body["message_ids"]) == {str(by_number.message_id), str(by_uuid.message_id)}


def test_a_limit_replays_the_oldest_and_reports_what_remains(api, park):
    first = park(priority="bulk", parked_at=timezone.now() - timedelta(minutes=3))
    park(priority="bulk", parked_at=timezone.now() - timedelta(minutes=2))
    park(priority="bulk", parked_at=timezone.now() - timedelta(minutes=1))
    body = replay(api, {"all": True, "limit": 1}).json()
    assert (body["matched"], body["selected"], body["replayed"], body["remaining"]) == (3, 1, 1, 2)
    assert body["dead_letter_ids"] == [first.pk]


def test_the_dead_letter_api_needs_a_key(client):
    assert client.get(LIST).status_code == 401
    assert client.post(REPLAY, data="{}", content_type="application/json").status_code == 401
