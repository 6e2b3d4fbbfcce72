"""WhatsApp templates through the API: template (a Twilio Content SID) and variables on a message,
body optional with a template, every bad field a 400 naming it (docs/whatsapp.md)."""

from __future__ import annotations

import json

import pytest

from messaging.models import Message

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/"
TEMPLATE = "HX" + "0123456789abcdef" * 2
GOOD = {"channel": "whatsapp", "to": "+14155552671", "template": TEMPLATE, "variables": {"1": "Ada", "2": "12:30"}}


def post(api, data, url=URL):
    return api.post(url, data=json.dumps(data), content_type="application/json")


def test_a_template_message_needs_no_body_and_shows_its_template(api):
    response = post(api, GOOD)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["template"], body["variables"], body["body"]) == (TEMPLATE, {"1": "Ada", "2": "12:30"}, "")
    message = Message.objects.get(pk=body["id"])
    assert (message.template, message.template_variables) == (TEMPLATE, {"1": "Ada", "2": "12:30"})
    assert api.get(f"{URL}{body['id']}/").json()["variables"] == {"1": "Ada", "2": "12:30"}


def test_a_message_without_a_template_shows_empty_ones(api):
    body = post(api, {"channel": "sms", "to": "+14155552671", "body": "hi"}).json()
    assert (body["template"], body["variables"]) == ("", {})


def test_a_template_with_an_sms_fallback_needs_the_body_for_the_sms(api):
    fallback = {"fallback_channels": ["sms"], "fallback_to": {"sms": "+14155552671"}}
    response = post(api, {**GOOD, **fallback})
    assert response.status_code == 400 and list(response.json()) == ["body"]
    assert "sms" in response.json()["body"][0]
    assert post(api, {**GOOD, **fallback, "body": "Your table is ready"}).status_code == 201


def test_a_template_on_an_sms_message_with_a_whatsapp_fallback_is_taken(api):
    data = {
        "channel": "sms",
        "to": "+14155552671",
        "body": "Your table is ready",
        "template": TEMPLATE,
        "fallback_channels": ["whatsapp"],
        "fallback_to": {"whatsapp": "+14155552671"},
    }
    assert post(api, data).status_code == 201


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"template": "HX123"}, "template"),
        ({"template": "MG" + "0" * 32}, "template"),
        ({"template": 7}, "template"),
        ({"channel": "sms", "body": "hi"}, "template"),  # no WhatsApp hop to send it on
        ({"variables": ["Ada"]}, "variables"),
        ({"variables": {"1": 7}}, "variables"),
        ({"variables": {"1": ""}}, "variables"),  # Twilio refuses an empty variable (21656)
        ({"variables": {"": "Ada"}}, "variables"),
        ({"variables": {"1\n": "Ada"}}, "variables"),
        ({"variables": {str(i): "x" for i in range(101)}}, "variables"),
        ({"variables": {"1": "x" * 9000}}, "variables"),
        ({"variables": {"1": "a\x00b"}}, "variables"),
    ],
)
def test_a_bad_template_or_variables_is_400_naming_the_field(api, change, field):
    response = post(api, {**GOOD, **change})
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not Message.objects.exists()


def test_variables_without_a_template_are_refused(api):
    response = post(api, {"channel": "whatsapp", "to": "+14155552671", "body": "hi", "variables": {"1": "Ada"}})
    assert response.status_code == 400 and list(response.json()) == ["variables"]


def test_without_a_template_the_body_is_still_required(api):
    response = post(api, {"channel": "whatsapp", "to": "+14155552671"})
    assert response.status_code == 400 and response.json() == {"body": ["This field is required."]}


def test_a_batch_takes_template_messages(api):
    items = [GOOD, {"channel": "sms", "to": "+14155552671", "body": "hi"}, {**GOOD, "template": "HX1"}]
    response = post(api, {"messages": items}, url=f"{URL}batch/")
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 201, 400]
    assert results[0]["message"]["template"] == TEMPLATE and "template" in results[2]["errors"]
