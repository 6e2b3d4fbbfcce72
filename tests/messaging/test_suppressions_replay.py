"""Replay and suppressions: a dead letter whose address is still suppressed is skipped (dry run,
API, command, admin say so), and replayed normally once the suppression is lifted."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from messaging.models import DeadLetter, EventSource, Message
from messaging.replay import SkipReason, dead_letters_replay
from messaging.suppressions.services import suppression_add, suppression_lift

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"


@pytest.fixture(autouse=True)
def _no_broker(monkeypatch):
    monkeypatch.setattr("messaging.replay.message_publish", lambda **kwargs: True)
    monkeypatch.setattr("messaging.ingest.messages_publish", lambda **kwargs: None)


@pytest.fixture
def suppressed_dead_letter(api, client_key):
    """A message refused at acceptance (its dead letter parked) and the suppression that refused it."""
    suppression, _ = suppression_add(client=client_key[0], channel="sms", address=NUMBER, reason="stop_keyword")
    body = api.post("/api/v1/messages/", {"channel": "sms", "to": NUMBER, "body": "hi"}, format="json").json()
    assert body["state"] == "failed"
    return DeadLetter.objects.get(message_id=body["id"]), suppression


def replay(dead_letter, **options):
    return dead_letters_replay(
        selection=DeadLetter.objects.filter(pk=dead_letter.pk), actor="ops", via=EventSource.COMMAND, **options
    )


def test_a_suppressed_dead_letter_is_refused_even_forced_then_replayed_once_lifted(suppressed_dead_letter):
    dead_letter, suppression = suppressed_dead_letter
    dry = replay(dead_letter, dry_run=True)
    assert dry.replayed == 0 and dry.skipped == {SkipReason.SUPPRESSED: 1}
    forced = replay(dead_letter, force=True)
    assert forced.replayed == 0 and forced.skipped == {SkipReason.SUPPRESSED: 1}
    dead_letter.refresh_from_db()
    assert dead_letter.replayed_at is None and Message.objects.get().state == "failed"
    suppression_lift(suppression=suppression, reason="texted START by phone call")
    assert replay(dead_letter, dry_run=True).replayed == 1
    done = replay(dead_letter)
    assert done.replayed == 1 and not done.skipped
    assert Message.objects.get().state == "accepted"


def test_a_message_with_a_fallback_hop_not_suppressed_is_replayed(client_key, park):
    dead_letter = park(
        state="failed",
        error_type="suppressed",
        fallback_channels=["email"],
        fallback_to={"email": "ada@example.com"},
        to=NUMBER,
    )
    suppression_add(client=client_key[0], channel="sms", address=NUMBER, reason="stop_keyword")
    assert replay(dead_letter, dry_run=True).replayed == 1
    email, _ = suppression_add(client=client_key[0], channel="email", address="ADA@example.com", reason="complaint")
    assert replay(dead_letter, dry_run=True).skipped == {SkipReason.SUPPRESSED: 1}
    suppression_lift(suppression=email, reason="x")
    assert replay(dead_letter).replayed == 1


def test_the_api_and_the_command_report_suppressed(api, suppressed_dead_letter):
    dead_letter, _ = suppressed_dead_letter
    answer = api.post("/api/v1/dead-letters/replay/", {"ids": [str(dead_letter.pk)]}, format="json").json()
    assert answer["replayed"] == 0 and answer["skipped"] == {"suppressed": 1}
    out = io.StringIO()
    call_command("replay_dead_letters", "--id", str(dead_letter.pk), "--json", stdout=out)
    assert json.loads(out.getvalue())["skipped"] == {"suppressed": 1}
    out = io.StringIO()
    call_command("replay_dead_letters", "--id", str(dead_letter.pk), "--yes", stdout=out)
    assert "Lift it" in out.getvalue()
