"""The callback endpoints API: create with a secret, list, read, change, delete, rotate; each bad
field named; a client sees only its own endpoints; rotated secrets overlap."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timedelta

import pytest
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from messaging.callbacks.endpoints import callback_endpoint_rotate_secret, secrets_active
from messaging.models import Callback, CallbackEndpoint, DeadLetter
from tests.support.callback_rows import callback_make, endpoint_make

pytestmark = pytest.mark.django_db

URL = "/api/v1/callback-endpoints/"


def create(api, **body):
    return api.post(URL, {"url": "https://hooks.example.com/a", **body}, format="json")


def test_create_answers_the_endpoint_and_its_secret_once_readable_later(api, client_key):
    response = create(api, events=["delivered", "attempt.failed"], description="prod receiver")
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["url"] == "https://hooks.example.com/a" and body["events"] == ["delivered", "attempt.failed"]
    assert body["enabled"] is True and body["per_message"] is False and body["failing_since"] is None
    secret = body["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    endpoint = CallbackEndpoint.objects.get(pk=body["id"])
    assert endpoint.client == client_key[0] and endpoint.secrets[0]["secret"] == secret

    read = api.get(f"{URL}{body['id']}/").json()
    assert "secret" not in read and "secrets" not in read and read["description"] == "prod receiver"
    secrets = api.get(f"{URL}{body['id']}/secret/").json()
    assert secrets["secret"] == secret and [s["secret"] for s in secrets["secrets"]] == [secret]
    assert secrets["secrets"][0]["expires_at"] is None


def test_list_is_the_clients_own_newest_first(api, other_api):
    create(api, url="https://hooks.example.com/1")
    create(api, url="https://hooks.example.com/2")
    create(other_api, url="https://other.example.com/x")
    listed = api.get(URL).json()["results"]
    assert [e["url"] for e in listed] == ["https://hooks.example.com/2", "https://hooks.example.com/1"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"url": "ftp://hooks.example.com/a"}, "url"),
        ({"url": "not a url"}, "url"),
        ({"url": "https://user:pw@hooks.example.com/a"}, "url"),
        ({"url": "https://hooks.example.com/" + "a" * 2000}, "url"),
        ({"events": ["delivered", "bounced"]}, "events"),
        ({"events": ["delivered", "delivered"]}, "events"),
        ({"events": "delivered"}, "events"),
        ({"description": "line\nbreak"}, "description"),
        ({"enabled": "maybe"}, "enabled"),
        ({"secret": "whsec_mine"}, "secret"),  # unknown field: a 400, not ignored
    ],
)
def test_each_bad_field_is_named_and_nothing_is_stored(api, body, field):
    response = create(api, **body)
    assert response.status_code == 400 and field in response.json(), response.json()
    assert not CallbackEndpoint.objects.exists()


def test_one_endpoint_per_url_and_client(api, other_api):
    first = create(api).json()
    again = create(api)
    assert again.status_code == 400 and f"id {first['id']}" in again.json()["url"][0]
    assert create(other_api).status_code == 201  # another client may use the same URL


def test_another_clients_endpoint_is_not_found_by_any_door(api, other_api):
    theirs = create(other_api).json()["id"]
    for response in (
        api.get(f"{URL}{theirs}/"),
        api.patch(f"{URL}{theirs}/", {"description": "mine now"}, format="json"),
        api.delete(f"{URL}{theirs}/"),
        api.get(f"{URL}{theirs}/secret/"),
        api.post(f"{URL}{theirs}/rotate-secret/"),
    ):
        assert response.status_code == 404
    assert CallbackEndpoint.objects.get(pk=theirs).description == ""


def test_patch_changes_the_fields_given(api):
    endpoint = create(api, events=["delivered"]).json()
    response = api.patch(
        f"{URL}{endpoint['id']}/",
        {"url": "https://hooks.example.com/b", "events": [], "description": "all events"},
        format="json",
    )
    assert response.status_code == 200, response.json()
    assert (response.json()["url"], response.json()["events"]) == ("https://hooks.example.com/b", [])
    create(api, url="https://hooks.example.com/c")
    taken = api.patch(f"{URL}{endpoint['id']}/", {"url": "https://hooks.example.com/c"}, format="json")
    assert taken.status_code == 400 and "url" in taken.json()
    unknown = api.patch(f"{URL}{endpoint['id']}/", {"secrets": []}, format="json")
    assert unknown.status_code == 400 and "secrets" in unknown.json()


def test_disabling_parks_the_pending_callbacks_and_enabling_clears_the_failure_run(api, make_message, client_key):
    endpoint = endpoint_make(client_key[0], failing_since=timezone.now() - timedelta(hours=2))
    message = make_message()
    pending = callback_make(message, endpoint, sequence=1)
    delivered = callback_make(message, endpoint, sequence=2, state="delivered")

    response = api.patch(f"{URL}{endpoint.pk}/", {"enabled": False}, format="json")
    assert response.status_code == 200
    assert response.json()["enabled"] is False and response.json()["disabled_reason"] == "disabled by the client"
    pending.refresh_from_db()
    delivered.refresh_from_db()
    assert (pending.state, delivered.state) == ("dead_lettered", "delivered")
    dead = DeadLetter.objects.get(callback=pending)
    assert (dead.kind, dead.reason, dead.client_id) == ("callback", "endpoint_disabled", client_key[0].pk)

    response = api.patch(f"{URL}{endpoint.pk}/", {"enabled": True}, format="json").json()
    assert response["enabled"] is True
    assert (response["disabled_at"], response["disabled_reason"], response["failing_since"]) == (None, "", None)


def test_delete_drops_the_endpoint_with_its_callbacks(api, make_message, client_key):
    endpoint = endpoint_make(client_key[0])
    callback_make(make_message(), endpoint)
    assert api.delete(f"{URL}{endpoint.pk}/").status_code == 204
    assert not CallbackEndpoint.objects.filter(pk=endpoint.pk).exists() and not Callback.objects.exists()
    assert api.get(f"{URL}{endpoint.pk}/").status_code == 404


def sign_as_sent(endpoint: CallbackEndpoint, body: bytes, msg_id: str, now: datetime, *, secrets_at=None) -> dict:
    """The headers of a callback sent at `now`, signed with every secret still signing (at
    `secrets_at`, default now) as the deliverer signs."""
    active = secrets_active(endpoint.secrets, now=secrets_at or now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": " ".join(Webhook(s["secret"]).sign(msg_id, now, body) for s in active),
    }


def test_after_a_rotation_both_secrets_verify_until_the_overlap_ends(api, client_key, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "CALLBACK_SECRET_OVERLAP_SECONDS": 3600.0}
    created = create(api).json()
    old = created["secret"]
    response = api.post(f"{URL}{created['id']}/rotate-secret/")
    assert response.status_code == 200
    new = response.json()["secret"]
    assert new != old and [s["secret"] for s in response.json()["secrets"]] == [new, old]
    assert api.get(f"{URL}{created['id']}/secret/").json()["secret"] == new

    endpoint = CallbackEndpoint.objects.get(pk=created["id"])
    old_ends = datetime.fromisoformat(endpoint.secrets[1]["expires_at"])
    assert timedelta(minutes=59) < old_ends - timezone.now() <= timedelta(hours=1)
    body = json.dumps({"type": "message.delivered", "data": {"sequence": 3}}, separators=(",", ":")).encode()
    now = timezone.now()
    headers = sign_as_sent(endpoint, body, "msg_rotation", now)
    # A receiver still on the old secret and one already on the new both accept it.
    assert Webhook(old).verify(body, headers)["data"]["sequence"] == 3
    assert Webhook(new).verify(body, headers)["data"]["sequence"] == 3

    # Past the overlap only the new secret signs: the old one no longer verifies.
    later = old_ends + timedelta(seconds=1)
    assert [s["secret"] for s in secrets_active(endpoint.secrets, now=later)] == [new]
    late = sign_as_sent(endpoint, body, "msg_rotation", now, secrets_at=later)
    assert Webhook(new).verify(body, late)["data"]["sequence"] == 3
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(old).verify(body, late)


def test_a_rotation_prunes_expired_secrets_and_keeps_an_earlier_end(client_key):
    endpoint = endpoint_make(client_key[0])
    first = endpoint.secrets[0]["secret"]
    start = timezone.now()
    callback_endpoint_rotate_secret(endpoint_id=endpoint.pk, now=start)
    second_end = callback_endpoint_rotate_secret(endpoint_id=endpoint.pk, now=start + timedelta(hours=1)).secrets
    # Rotated again within the overlap: the first keeps its own (earlier) end, the second gets one.
    assert [s["secret"] == first for s in second_end] == [False, False, True]
    assert datetime.fromisoformat(second_end[2]["expires_at"]) == start + timedelta(days=1)
    assert datetime.fromisoformat(second_end[1]["expires_at"]) == start + timedelta(hours=25)
    after = callback_endpoint_rotate_secret(endpoint_id=endpoint.pk, now=start + timedelta(hours=24, seconds=1))
    assert first not in [s["secret"] for s in after.secrets] and len(after.secrets) == 3


def test_the_signature_is_plain_hmac_sha256_as_the_receivers_guide_shows(client_key):
    """docs/callbacks.md verifies with hmac and base64 only: the same answer as the library."""
    endpoint = endpoint_make(client_key[0])
    secret = endpoint.secrets[0]["secret"]
    body, msg_id, now = b'{"type":"message.accepted"}', "msg_plain", timezone.now()
    signed = Webhook(secret).sign(msg_id, now, body)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mine = hmac.new(key, f"{msg_id}.{int(now.timestamp())}.".encode() + body, hashlib.sha256).digest()
    assert signed == "v1," + base64.b64encode(mine).decode()


def test_the_receivers_guide_verifies_what_the_library_signs(client_key):
    """The plain-Python verifier printed in docs/callbacks.md, run as printed."""
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[2] / "docs" / "callbacks.md").read_text()
    section = guide[guide.index("## Verifying a callback") :]
    code = section[
        section.index("```python\n") + len("```python\n") : section.index("```\n", section.index("```python"))
    ]
    namespace: dict = {}
    exec(compile(code, "docs/callbacks.md", "exec"), namespace)  # noqa: S102 - our own documentation
    verify = namespace["verify"]

    endpoint = endpoint_make(client_key[0])
    secret = endpoint.secrets[0]["secret"]
    body = b'{"type":"message.delivered","data":{"sequence":3}}'
    now = timezone.now()
    headers = sign_as_sent(endpoint, body, "msg_guide", now)
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body.replace(b"3", b"4"))  # tampered body
    assert not verify(secret, {**headers, "webhook-id": "msg_other"}, body)
    stale = sign_as_sent(endpoint, body, "msg_guide", now - timedelta(minutes=10))
    assert not verify(secret, stale, body)  # too old
    other = endpoint_make(client_key[0], url="https://hooks.example.com/other").secrets[0]["secret"]
    assert not verify(other, headers, body)
