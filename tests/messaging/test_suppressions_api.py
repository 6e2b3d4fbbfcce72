"""The suppressions API: list with filters, read, add (idempotent), lift with a reason, CSV import;
each bad field named; a client sees and touches only its own list."""

from __future__ import annotations

import pytest
from django.core.management import call_command

from messaging.models import ApiClient, Suppression
from messaging.suppressions.files import IMPORT_MAX_LINES
from messaging.suppressions.services import suppression_add

pytestmark = pytest.mark.django_db

URL = "/api/v1/suppressions/"
NUMBER = "+14155552671"


def add(api, **body):
    return api.post(URL, {"channel": "sms", "address": NUMBER, **body}, format="json")


def import_csv(api, text: str):
    return api.generic("POST", f"{URL}import/", text.encode(), content_type="text/csv")


def test_add_stores_a_manual_suppression_and_again_answers_the_same_one(api, client_key):
    response = add(api, address="+1 (415) 555-2671", note="asked by phone")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["address"] == NUMBER and body["reason"] == "manual" and body["scope"] == ""
    assert body["source"] == "api" and body["active"] is True and body["note"] == "asked by phone"
    again = add(api)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert Suppression.objects.get().client == client_key[0]
    email = api.post(URL, {"channel": "email", "address": "Ada@Example.COM", "scope": "news"}, format="json")
    assert email.status_code == 201 and email.json()["address"] == "ada@example.com"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"channel": "fax"}, "channel"),
        ({"address": "4155552671"}, "address"),  # not E.164
        ({"address": "+1415555"}, "address"),
        ({"channel": "email", "address": "not-an-email"}, "address"),
        ({"reason": "stop_keyword"}, "reason"),  # only Conductor records the others
        ({"scope": "x" * 101}, "scope"),
        ({"scope": "line\nbreak"}, "scope"),
        ({"note": "n" * 1001}, "note"),
        ({"adress": NUMBER}, "adress"),  # a typo: unknown field, a 400
    ],
)
def test_each_bad_field_is_named_and_nothing_is_stored(api, body, field):
    response = add(api, **body)
    assert response.status_code == 400 and field in response.json(), response.json()
    assert not Suppression.objects.exists()


def test_list_filters_newest_first_and_only_the_clients_own(api, other_api, client_key):
    acme = client_key[0]
    first = add(api).json()
    second = add(api, scope="marketing").json()
    email = api.post(URL, {"channel": "email", "address": "ada@example.com"}, format="json").json()
    add(other_api, address="+14155552672")
    suppression_add(client=acme, channel="sms", address="+14155552673", reason="stop_keyword")

    def ids(**query):
        response = api.get(URL, query)
        assert response.status_code == 200, response.json()
        return [row["id"] for row in response.json()["results"]]

    everything = ids()
    assert len(everything) == 4 and everything[1:] == [email["id"], second["id"], first["id"]]
    assert ids(channel="email") == [email["id"]]
    assert ids(address="+1 415 555 2671") == [second["id"], first["id"]]  # normalized before comparing
    assert ids(address="ADA@example.com") == [email["id"]]
    assert ids(scope="marketing") == [second["id"]]
    assert len(ids(reason="stop_keyword")) == 1
    api.post(f"{URL}{first['id']}/lift/", {"reason": "by request"}, format="json")
    assert first["id"] not in ids(active="true") and ids(active="false") == [first["id"]]
    assert api.get(URL, {"active": "maybe"}).status_code == 400
    assert api.get(URL, {"reason": "bored"}).status_code == 400


def test_another_clients_suppression_is_not_found(api, other_api):
    theirs = add(other_api).json()
    assert api.get(f"{URL}{theirs['id']}/").status_code == 404
    assert api.post(f"{URL}{theirs['id']}/lift/", {"reason": "x"}, format="json").status_code == 404
    assert Suppression.objects.get().active


def test_lift_needs_a_reason_and_twice_is_a_conflict(api):
    created = add(api).json()
    missing = api.post(f"{URL}{created['id']}/lift/", {}, format="json")
    assert missing.status_code == 400 and "reason" in missing.json()
    lifted = api.post(f"{URL}{created['id']}/lift/", {"reason": "asked to be sent to again"}, format="json")
    assert lifted.status_code == 200, lifted.json()
    body = lifted.json()
    assert body["active"] is False and body["lifted_reason"] == "asked to be sent to again"
    assert body["lifted_at"] and "acme" in body["lifted_by"]
    again = api.post(f"{URL}{created['id']}/lift/", {"reason": "again"}, format="json")
    assert again.status_code == 409 and "Already lifted" in again.json()["detail"]
    assert api.get(f"{URL}{created['id']}/").json()["lifted_reason"] == "asked to be sent to again"
    assert add(api).status_code == 201  # lifted: a new one may be added, the old row kept
    assert Suppression.objects.count() == 2


def test_csv_import_adds_good_lines_and_names_each_bad_one(api, client_key):
    add(api)  # already there
    text = (
        "channel,address,scope,note\n"
        f"sms,{NUMBER},,\n"
        "sms,+14155552672,marketing,from the old system\n"
        "email,Ada@Example.com,,\n"
        "fax,+14155552673,,\n"
        "sms,4155552674,,\n"
        "email,ada@example.com,,\n"  # the same as line 4: already
        "\n"
        'sms,+14155552675,"a,b",x,extra\n'
    )
    response = import_csv(api, text)
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["added"] == 2 and body["already"] == 2
    assert [(e["line"], e["field"]) for e in body["errors"]] == [(5, "channel"), (6, "address"), (9, "line")]
    rows = Suppression.objects.filter(client=client_key[0], source="api import")
    assert {(r.channel, r.address, r.scope) for r in rows} == {
        ("sms", "+14155552672", "marketing"),
        ("email", "ada@example.com", ""),
    }
    assert rows.get(scope="marketing").note == "from the old system" and rows.first().reason == "manual"


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        (f"sms,{NUMBER}\n", "header"),
        ("channel,address,colour\nsms,+14155552671,red\n", "colour"),
        ("channel,address\n" + f"sms,{NUMBER}\n" * (IMPORT_MAX_LINES + 1), "More than"),
    ],
)
def test_a_csv_without_a_header_or_with_too_many_lines_is_refused_whole(api, text, words):
    response = import_csv(api, text)
    assert response.status_code == 400 and words in response.json()["detail"], response.json()
    assert not Suppression.objects.exists()


def test_csv_import_refuses_reasons_a_client_may_not_give_and_other_media(api):
    response = import_csv(api, f"channel,address,reason\nsms,{NUMBER},hard_bounce\nsms,+14155552672,manual\n")
    assert response.json()["added"] == 1 and response.json()["errors"][0]["field"] == "reason"
    json_body = api.post(f"{URL}import/", {"channel": "sms"}, format="json")
    assert json_body.status_code == 415


def test_the_schema_documents_the_suppression_endpoints(tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))
    schema = (tmp_path / "schema.yml").read_text()
    assert "/api/v1/suppressions/{id}/lift/" in schema and "/api/v1/suppressions/import/" in schema
    assert "text/csv" in schema


def test_unauthenticated_is_refused(client):
    ApiClient.objects.create(name="nobody")
    assert client.get(URL).status_code == 401
