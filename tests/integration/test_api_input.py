"""Hostile input through real HTTP (gunicorn, PostgreSQL): every bad input a 4xx naming the field
and nothing stored, never a 500 or a 503 (issue 20)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from messaging.models import Message, MessageEvent

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

GOOD = {"channel": "sms", "to": "+14155552671", "body": "Your code is 123456"}
EMAIL = {"channel": "email", "to": "ada@example.com", "subject": "Hello", "body": "Hi"}


@pytest.fixture
def api(live, client_key):
    session = live.api(client_key[1])
    base = f"{live.web_url}/api/v1/messages/"

    def post(data, path="", **kwargs):
        raw = data if isinstance(data, str) else json.dumps(data)
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return session.post(base + path, data=raw.encode("utf-8", "surrogatepass"), headers=headers, timeout=60)

    return post


def stored() -> tuple[int, int]:
    return Message.objects.count(), MessageEvent.objects.count()


BAD = [
    (GOOD | {"ttl_seconds": 10**12}, {}, "ttl_seconds"),
    (
        '{"channel": "sms", "to": "+14155552671", "body": "x", "metadata": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
        {},
        "metadata",
    ),
    (GOOD, {"Idempotency-Key": "k" * 1000}, "Idempotency-Key"),
    (GOOD | {"metadata": {"note": "a\u0000b"}}, {}, "metadata"),
    (GOOD | {"metadata": {"note": "\ud800"}}, {}, "metadata"),
    (GOOD | {"metadata": {"\ud800": 1}}, {}, "metadata"),
    (GOOD | {"body": "a\u0000b"}, {}, "body"),
    (GOOD | {"category": "a\u0000"}, {}, "category"),
    (EMAIL | {"subject": "Hello\r\nBcc: victim@example.com"}, {}, "subject"),
    (GOOD | {"category": "otp\x01"}, {}, "category"),
    (GOOD | {"ordering_key": "order\x1f42"}, {}, "ordering_key"),
]


@pytest.mark.parametrize("data,headers,field", BAD, ids=[f"{f}-{i}" for i, (_, _, f) in enumerate(BAD)])
def test_each_bad_input_is_400_naming_the_field_and_nothing_is_stored(api, data, headers, field):
    response = api(data, headers=headers)
    assert response.status_code == 400, (field, response.status_code, response.text[:300])
    assert response.headers["Content-Type"] == "application/json"
    assert field in response.json(), (field, response.text[:300])
    assert stored() == (0, 0)


def test_a_batch_answers_each_item_on_its_own(api):
    items = [GOOD, None, "text", GOOD | {"ttl_seconds": 10**12}, GOOD | {"metadata": {"x": "\u0000"}}, EMAIL]
    response = api({"messages": items}, path="batch/")
    assert response.status_code == 200, response.text[:500]
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 400, 400, 400, 400, 201]
    assert "ttl_seconds" in results[3]["errors"] and "metadata" in results[4]["errors"]
    assert stored() == (2, 2)


def test_a_batch_past_djangos_upload_limit_but_within_the_products_is_accepted(api):
    items = [EMAIL | {"to": f"user{i}@example.com", "body": "x" * 3000, "priority": "bulk"} for i in range(1000)]
    response = api({"messages": items}, path="batch/")
    assert response.status_code == 200, response.text[:500]
    assert response.json()["created"] == 1000
    assert Message.objects.count() == 1000


def test_a_request_over_the_limit_is_a_json_413_naming_it(live, client_key):
    """Announced past the limit: refused before the body is read (sending 1 GB would prove no more)."""
    from messaging.api.parsers import api_max_request_bytes

    url = urlsplit(live.web_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.putrequest("POST", "/api/v1/messages/batch/")
        connection.putheader("Authorization", f"Bearer {client_key[1]}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(api_max_request_bytes() + 1))
        connection.endheaders(b'{"messages": [')
        response = connection.getresponse()
        body = json.loads(response.read())
    finally:
        connection.close()
    assert response.status == 413 and response.getheader("Content-Type") == "application/json"
    assert body["max_bytes"] == api_max_request_bytes() and "bytes" in body["detail"]
    assert stored() == (0, 0)


def test_a_lower_case_bearer_scheme_is_accepted(live, client_key):
    import requests

    response = requests.post(
        f"{live.web_url}/api/v1/messages/", json=GOOD, headers={"Authorization": f"bearer {client_key[1]}"}, timeout=10
    )
    assert response.status_code == 201, response.text
