"""manage.py replay_dead_letters: filters, dry run, confirmation, output."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from messaging.management.commands.replay_dead_letters import CONFIRM_ABOVE, parse_when
from messaging.models import DeadLetter, Message

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2h", NOW - timedelta(hours=2)),
        ("90m", NOW - timedelta(minutes=90)),
        ("1d12h", NOW - timedelta(days=1, hours=12)),
        ("1w", NOW - timedelta(weeks=1)),
        ("45s", NOW - timedelta(seconds=45)),
        ("0.5h", NOW - timedelta(minutes=30)),
        ("2026-11-30T08:00:00Z", datetime(2026, 11, 30, 8, tzinfo=UTC)),
        ("2026-11-30 08:00", datetime(2026, 11, 30, 8, tzinfo=UTC)),  # naive: UTC
        ("2026-11-29", datetime(2026, 11, 29, tzinfo=UTC)),
    ],
)
def test_when_is_a_duration_before_now_or_a_timestamp(text, expected):
    assert parse_when(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["2 hours", "h", "yesterday", "2026-13-01", "-2h"])
def test_anything_else_is_refused(text):
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when(text, now=NOW)


def run(*args) -> str:
    out = StringIO()
    call_command("replay_dead_letters", *args, stdout=out)
    return out.getvalue()


def run_json(*args) -> dict:
    return json.loads(run(*args, "--json"))


@pytest.mark.django_db
def test_a_dry_run_lists_what_matched_and_changes_nothing(park):
    match = park(error_type="provider_timeout", priority="bulk", parked_at=timezone.now() - timedelta(minutes=30))
    park(error_type="provider_timeout", priority="bulk", parked_at=timezone.now() - timedelta(hours=3))  # too old
    park(error_type="provider_5xx", priority="bulk")  # other error
    park(error_type="provider_timeout", priority="bulk", channel="email", to="ada@example.com")  # other channel
    out = run("--since", "2h", "--channel", "sms", "--error-type", "provider_timeout", "--dry-run")
    assert "Matched 1 parked dead letter." in out
    assert str(match.message_id) in out and "by error type: provider_timeout 1" in out
    assert "Dry run: 1 would be replayed" in out and "Nothing was changed" in out
    assert DeadLetter.objects.filter(replayed_at__isnull=True).count() == 4


@pytest.mark.django_db
def test_the_replay_sends_the_match_once_and_a_second_run_nothing(park):
    match = park(error_type="provider_timeout", priority="bulk")
    park(error_type="provider_5xx", priority="bulk")
    out = run("--error-type", "provider_timeout")
    assert "Replayed 1 of 1" in out
    assert Message.objects.get(pk=match.message_id).send_generation == 2
    match.refresh_from_db()
    assert match.replayed_via == "command" and match.replayed_by.endswith("@manage.py")
    assert "No parked dead letter matches" in run("--error-type", "provider_timeout")


@pytest.mark.django_db
def test_json_output_for_scripts(park):
    first, second = park(priority="bulk"), park(priority="bulk", category="otp")
    report = run_json("--all", "--dry-run")
    assert report["matched"] == 2 and report["dry_run"] is True
    assert report["dead_letter_ids"] == [first.pk, second.pk]
    assert run_json("--category", "otp")["message_ids"] == [str(second.message_id)]


@pytest.mark.django_db
def test_ids_may_be_dead_letter_or_message_ids(park):
    by_number, by_uuid, _ = park(priority="bulk"), park(priority="bulk"), park(priority="bulk")
    report = run_json("--id", str(by_number.pk), "--id", str(by_uuid.message_id))
    assert sorted(report["message_ids"]) == sorted([str(by_number.message_id), str(by_uuid.message_id)])


@pytest.mark.django_db
def test_past_their_deadline_critical_messages_need_force(park):
    park(priority="critical", expires_at=timezone.now() - timedelta(minutes=1))
    out = run("--priority", "critical")
    assert "Replayed 0 of 1" in out and "1 past deadline" in out and "--force" in out
    assert "Replayed 1 of 1" in run("--priority", "critical", "--force")


@pytest.mark.django_db
def test_a_large_replay_needs_yes_when_no_one_can_answer(park, monkeypatch):
    for _ in range(CONFIRM_ABOVE + 1):
        park(priority="bulk")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    with pytest.raises(CommandError, match="add --yes"):
        run("--all")
    assert not DeadLetter.objects.filter(replayed_at__isnull=False).exists()
    assert "Replayed 50 of 50" in run("--all", "--limit", "50")  # under the threshold: no question
    assert f"Replayed {CONFIRM_ABOVE + 1 - 50} of" in run("--all", "--yes")


@pytest.mark.django_db
def test_a_large_replay_asks_on_a_terminal(park, monkeypatch):
    for _ in range(CONFIRM_ABOVE + 1):
        park(priority="bulk")
    monkeypatch.setattr("sys.stdin.isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(CommandError, match="Nothing replayed"):
        run("--all")
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert f"Replayed {CONFIRM_ABOVE + 1} of" in run("--all")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args, message",
    [
        ([], "Give at least one filter"),
        (["--since", "soon"], "neither a duration"),
        (["--since", "1h", "--until", "2h"], "must be before --until"),
        (["--client", "nobody"], "No API client named nobody"),
        (["--id", "abc"], "neither a dead-letter id"),
        (["--all", "--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_bad_arguments_say_what_to_do(args, message, park):
    with pytest.raises(CommandError, match=message):
        run(*args)


@pytest.mark.django_db
def test_client_filter(park, other_api):
    from messaging.models import ApiClient

    park(priority="bulk", client=ApiClient.objects.get(name="globex"))
    mine = park(priority="bulk")
    assert run_json("--client", "acme", "--dry-run")["dead_letter_ids"] == [mine.pk]
