"""Hostile input through the API in-process (issue 20): every bad input a 4xx naming the field,
nothing stored; the schema says so. The same through real HTTP: tests/integration/test_api_input.py."""

from __future__ import annotations

import json

import pytest

from messaging.api.parsers import api_max_request_bytes
from messaging.models import Message, MessageEvent

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/"
BATCH = f"{URL}batch/"
GOOD = {"channel": "sms", "to": "+14155552671", "body": "Your code is 123456"}
EMAIL = {"channel": "email", "to": "ada@example.com", "subject": "Hello", "body": "Hi"}


def post(api, data, url=URL, **extra):
    raw = data if isinstance(data, (str, bytes)) else json.dumps(data)
    return api.post(url, data=raw, content_type="application/json", **extra)


def deep(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


def assert_nothing_stored():
    assert Message.objects.count() == 0 and MessageEvent.objects.count() == 0


# Each is refused whole with a 400 naming the field (json.dumps escapes \u0000 and lone surrogates).
BAD_FIELDS = [
    ({"ttl_seconds": 10**12}, "ttl_seconds"),
    ({"ttl_seconds": 366 * 24 * 3600 + 1}, "ttl_seconds"),
    ({"metadata": {"note": "a\u0000b"}}, "metadata"),
    ({"metadata": {"note": "\ud800"}}, "metadata"),
    ({"metadata": {"a\u0000": 1}}, "metadata"),
    ({"metadata": {"list": [{"deeper": "\udfff"}]}}, "metadata"),
    ({"body": "a\u0000b"}, "body"),
    ({"body": "\ud83d alone"}, "body"),
    ({"category": "otp\u0000"}, "category"),
    ({"category": "o\x07tp"}, "category"),
    ({"category": "a\nb"}, "category"),
    ({"ordering_key": "order\x1b42"}, "ordering_key"),
    ({"ordering_key": "order\u202842"}, "ordering_key"),
    ({"idempotency_key": "k\r\n1"}, "idempotency_key"),
    ({**EMAIL, "subject": "Hello\r\nBcc: victim@example.com"}, "subject"),
    ({**EMAIL, "subject": "Hello\nthere"}, "subject"),
    ({**EMAIL, "subject": "Hello\u0085there"}, "subject"),
    ({**EMAIL, "subject": "a\u0000"}, "subject"),
    ({"fallback_channels": ["email"], "fallback_to": {"email": "a\u0000@example.com"}}, "fallback_to"),
]


@pytest.mark.parametrize("change,field", BAD_FIELDS, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_FIELDS)])
def test_bad_text_and_ranges_are_400_naming_the_field(api, change, field):
    response = post(api, {**GOOD, **change})
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert_nothing_stored()


def test_a_subject_may_hold_a_tab_and_trailing_line_breaks_are_trimmed(api):
    response = post(api, {**EMAIL, "subject": "Invoice\t42\r\n"})
    assert response.status_code == 201, response.content
    assert response.json()["subject"] == "Invoice\t42"


def test_the_longest_ttl_is_accepted(api):
    assert post(api, {**GOOD, "ttl_seconds": 366 * 24 * 3600}).status_code == 201


@pytest.mark.parametrize("levels", [65, 900, 5000])
def test_json_nested_too_deep_is_400_naming_the_field(api, levels):
    raw = '{"channel": "sms", "to": "+14155552671", "body": "x", "metadata": ' + deep(levels) + "}"
    response = post(api, raw)
    assert response.status_code == 400, response.content
    assert "metadata" in response.json(), response.json()
    assert_nothing_stored()


def test_json_nested_too_deep_in_a_batch_names_the_item(api):
    items = [json.dumps(GOOD), '{"channel": "sms", "metadata": ' + deep(5000) + "}"]
    response = post(api, '{"messages": [' + ",".join(items) + "]}", url=BATCH)
    assert response.status_code == 400, response.content
    assert "metadata" in response.json()["messages"]["1"], response.json()
    assert_nothing_stored()


def test_nesting_within_the_limit_is_accepted(api):
    metadata = json.loads(deep(60))
    assert post(api, {**GOOD, "metadata": metadata}).status_code == 201


def test_a_number_out_of_float_range_is_400(api):
    response = post(api, '{"channel": "sms", "to": "+14155552671", "body": "x", "metadata": {"n": 1e400}}')
    assert response.status_code == 400 and "JSON" in response.json()["detail"], response.content
    assert_nothing_stored()


@pytest.mark.parametrize(
    "header", ["k" * 1000, "k" * 256, "a\x7fb"], ids=["1000-characters", "256-characters", "control-character"]
)
def test_a_bad_idempotency_key_header_is_400_naming_it(api, header):
    response = post(api, GOOD, HTTP_IDEMPOTENCY_KEY=header)
    assert response.status_code == 400, response.content
    assert "Idempotency-Key" in response.json(), response.json()
    assert_nothing_stored()


def test_an_idempotency_key_header_of_255_characters_works(api):
    first = post(api, GOOD, HTTP_IDEMPOTENCY_KEY="k" * 255)
    again = post(api, GOOD, HTTP_IDEMPOTENCY_KEY="k" * 255)
    assert (first.status_code, again.status_code) == (201, 200)
    assert Message.objects.count() == 1


def test_a_batch_with_null_and_bad_items_answers_each_on_its_own(api):
    items = [GOOD, None, 7, {**GOOD, "ttl_seconds": 10**12}, {**GOOD, "metadata": {"x": "\u0000"}}, GOOD]
    response = post(api, {"messages": items}, url=BATCH)
    assert response.status_code == 200, response.content
    body = response.json()
    assert [r["status"] for r in body["results"]] == [201, 400, 400, 400, 400, 201]
    assert "non_field_errors" in body["results"][1]["errors"] and "non_field_errors" in body["results"][2]["errors"]
    assert "ttl_seconds" in body["results"][3]["errors"] and "metadata" in body["results"][4]["errors"]
    assert (body["created"], body["failed"]) == (2, 4)
    assert Message.objects.count() == 2


def test_a_batch_of_1000_emails_with_3_kb_bodies_is_accepted(api):
    items = [{**EMAIL, "to": f"user{i}@example.com", "body": "x" * 3000} for i in range(1000)]
    raw = json.dumps({"messages": items})
    assert len(raw) > 2.5 * 1024 * 1024  # past Django's DATA_UPLOAD_MAX_MEMORY_SIZE
    response = post(api, raw, url=BATCH)
    assert response.status_code == 200, response.content[:300]
    assert response.json()["created"] == 1000 and Message.objects.count() == 1000


def test_the_default_request_limit_is_64_mib_and_0_fits_a_full_batch_at_the_longest_body(settings):
    assert api_max_request_bytes() == 64 * 1024 * 1024
    settings.CONDUCTOR = {**settings.CONDUCTOR, "API_MAX_REQUEST_BYTES": 0}
    assert api_max_request_bytes() >= 1000 * (262144 * 4 + 16384)


def test_a_request_over_the_limit_is_a_json_413_naming_it(api, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "API_MAX_REQUEST_BYTES": 10_000}
    response = post(api, {**GOOD, "body": "x" * 10_000})
    assert response.status_code == 413, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json()["max_bytes"] == 10_000 and "10000 bytes" in response.json()["detail"]
    response = post(api, {"messages": [GOOD] * 200}, url=BATCH)
    assert response.status_code == 413
    assert_nothing_stored()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer"])
def test_the_bearer_scheme_is_case_insensitive(client, client_key, scheme):
    response = post(client, GOOD, HTTP_AUTHORIZATION=f"{scheme} {client_key[1]}")
    assert response.status_code == 201, response.content


def test_a_path_that_is_not_a_uuid_is_a_json_404(api):
    response = api.get(f"{URL}not-a-uuid/")
    assert response.status_code == 404 and response.json() == {"detail": "Not found."}


def test_a_list_filter_time_with_any_iso_offset_is_answered_not_a_500(api):
    """Found by the fuzz test: PostgreSQL refuses a UTC offset past 15:59, which ISO 8601 allows."""
    response = api.get(URL, {"created_before": "0035-05-02T23:04:18.224-20:14"})
    assert response.status_code == 200 and response.json()["results"] == [], response.content
    response = api.get(URL, {"created_after": "0001-01-01T00:00:00+05:00"})  # before year 1 in UTC
    assert response.status_code == 400 and "created_after" in response.json(), response.content


# --- the schema says what the API answers -------------------------------------------------------
@pytest.fixture
def schema(api):
    return api.get("/api/schema/", HTTP_ACCEPT="application/json").json()


EXPECTED_ANSWERS = {
    ("/api/v1/messages/", "post"): {"200", "201", "400", "401", "403", "409", "413", "415", "422", "429", "503"},
    ("/api/v1/messages/", "get"): {"200", "400", "401", "404", "429", "503"},
    ("/api/v1/messages/batch/", "post"): {"200", "400", "401", "413", "415", "429", "503"},
    ("/api/v1/messages/{id}/", "get"): {"200", "401", "404", "429", "503"},
    ("/api/v1/messages/{id}/cancel/", "post"): {"200", "401", "404", "409", "429", "503"},
    ("/api/v1/dead-letters/", "get"): {"200", "400", "401", "404", "429", "503"},
    ("/api/v1/dead-letters/{id}/", "get"): {"200", "401", "404", "429", "503"},
    ("/api/v1/dead-letters/replay/", "post"): {"200", "400", "401", "413", "415", "429", "503"},
}


def test_the_schema_documents_every_answer(schema):
    for (path, method), codes in EXPECTED_ANSWERS.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) == codes | {"414"}, (path, method, sorted(responses))  # 414: gunicorn's
        for code in codes - {"200", "201"}:
            assert "application/json" in responses[code]["content"], (path, method, code)
    too_large = schema["paths"]["/api/v1/messages/batch/"]["post"]["responses"]["413"]["content"]
    assert too_large["application/json"]["schema"]["$ref"].endswith("/RequestTooLarge")


def test_the_schema_gives_the_limits_the_api_enforces(schema):
    fields = schema["components"]["schemas"]["MessageCreate"]["properties"]
    assert fields["ttl_seconds"]["minimum"] == 1 and fields["ttl_seconds"]["maximum"] == 366 * 24 * 3600
    assert fields["to"]["maxLength"] == 320
    assert {"pattern": r"^(whatsapp:)?\+[1-9][0-9]{1,14}$"} in fields["to"]["anyOf"]
    assert fields["body"]["minLength"] == 1 and fields["body"]["maxLength"] == 262144
    for name, length in (("subject", 998), ("category", 100), ("ordering_key", 255), ("idempotency_key", 255)):
        text = fields[name]["oneOf"][0] if "oneOf" in fields[name] else fields[name]  # oneOf: or blank
        assert text["maxLength"] == length and "pattern" in text, name
    [header] = [p for p in schema["paths"]["/api/v1/messages/"]["post"]["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key" and header["schema"]["maxLength"] == 255
    batch = schema["components"]["schemas"]["Batch"]["properties"]["messages"]
    assert batch["maxItems"] == 1000 and batch["minItems"] == 1
