"""Dead letter replay through the real stack: the command and the API select exactly what they
should, real workers send each replayed message once (the sandbox's request log counts), and two
replays racing over the same dead letters send nothing twice."""

from __future__ import annotations

import json
import random
import subprocess
import threading
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import DeadLetter, Message
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import wait_for_all
from tests.support.processes import PYTHON, REPO, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ADDRESSES = {"sms": "+1415555{:04d}", "whatsapp": "+1415556{:04d}", "email": "user{}@example.com"}
PROVIDERS = {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun"]}
STATE_FOR = {"invalid_recipient": "failed", "rejected": "failed", "provider_auth": "failed", "expired": "expired"}
OTHER_ERRORS = [
    "provider_5xx",
    "rate_limited",
    "invalid_recipient",
    "rejected",
    "circuit_open",
    "worker_lost",
    "expired",
]


@pytest.fixture
def key(live):
    return api_key_create(client_name="acme")[1]


def manage(live, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a management command as its own process against the stack (its database and broker)."""
    return subprocess.run(
        [PYTHON, "manage.py", *args], cwd=REPO, env=live.env, capture_output=True, text=True, timeout=timeout
    )


def manage_json(live, *args: str) -> dict:
    result = manage(live, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fixture_spec(seed: int = 5) -> list[dict]:
    """100 dead letters across channels, providers, error types and ages; a few already replayed.

    Returns one dict per dead letter with the attributes the filters look at, so the expected
    selection is computed here, independently of the selector under test.
    """
    rng = random.Random(seed)
    minutes = lambda low, high: timedelta(minutes=rng.uniform(low, high))  # noqa: E731
    spec = []
    # The target of `--since 2h --channel sms --error-type provider_timeout`: 12, two already replayed.
    spec += [dict(channel="sms", error_type="provider_timeout", age=minutes(5, 110)) for _ in range(12)]
    spec[0]["replayed"] = spec[1]["replayed"] = True
    spec += [dict(channel="sms", error_type="provider_timeout", age=minutes(125, 2000)) for _ in range(6)]  # too old
    spec += [dict(channel="whatsapp", error_type="provider_timeout", age=minutes(5, 110)) for _ in range(8)]
    spec += [dict(channel="email", error_type="provider_timeout", age=minutes(5, 110)) for _ in range(8)]
    while len(spec) < 100:
        spec.append(
            dict(channel=rng.choice(list(ADDRESSES)), error_type=rng.choice(OTHER_ERRORS), age=minutes(5, 3000))
        )
    for n, item in enumerate(spec):
        item.setdefault("replayed", False)
        item["provider"] = PROVIDERS[item["channel"]][n % len(PROVIDERS[item["channel"]])]
        item["to"] = ADDRESSES[item["channel"]].format(7000 + n)
        item["priority"] = rng.choice(["transactional", "bulk"])
    return spec


def build(park, spec: list[dict]) -> list[DeadLetter]:
    now = timezone.now()
    dead_letters = []
    for n, item in enumerate(spec):
        # A timeout leaves the outcome unknown: the replay asks the provider before sending.
        outcome = "ambiguous" if item["error_type"] == "provider_timeout" else "transient_error"
        dead_letter = park(
            state=STATE_FOR.get(item["error_type"], "dead_lettered"),
            error_type=item["error_type"],
            provider=item["provider"],
            outcome=outcome,
            parked_at=now - item["age"],
            channel=item["channel"],
            to=item["to"],
            subject="Your order" if item["channel"] == "email" else "",
            body=f"fixture {n}: your code is {100000 + n}",
            priority=item["priority"],
        )
        if item["replayed"]:
            DeadLetter.objects.filter(pk=dead_letter.pk).update(replayed_at=now, replayed_by="earlier")
        dead_letters.append(dead_letter)
    return dead_letters


def accepted_per_message(live) -> Counter:
    return Counter(r["message_id"] for r in live.sandbox_requests(accepted="true"))


def test_replay_by_filter_sends_exactly_the_match_once_and_again_nothing(live, park):
    spec = fixture_spec()
    dead_letters = build(park, spec)
    expected = {
        str(d.message_id)
        for d, item in zip(dead_letters, spec, strict=True)
        if item["channel"] == "sms"
        and item["error_type"] == "provider_timeout"
        and item["age"] < timedelta(hours=2)
        and not item["replayed"]
    }
    assert len(dead_letters) == 100 and len(expected) == 10
    parked_before = set(DeadLetter.objects.filter(replayed_at__isnull=True).values_list("pk", flat=True))
    command = ["replay_dead_letters", "--since", "2h", "--channel", "sms", "--error-type", "provider_timeout"]

    dry = manage_json(live, *command, "--dry-run")
    assert (dry["matched"], dry["replayed"], dry["dry_run"]) == (10, 10, True)
    assert set(dry["message_ids"]) == expected
    assert live.sandbox_requests() == [] and DeadLetter.objects.filter(replayed_at__isnull=True).count() == 98

    done = manage_json(live, *command)
    assert (done["matched"], done["replayed"], done["skipped"]) == (10, 10, {})
    final = wait_for_all(list(expected), {"delivered"}, timeout=60)
    assert final == {"delivered": 10}
    sent = accepted_per_message(live)
    assert set(sent) == expected, "only the matched messages reached a provider"
    assert set(sent.values()) == {1}, "a replayed message was accepted twice"
    tokens = {r["token"].rsplit(".", 1)[1] for r in live.sandbox_requests()}
    assert tokens == {"2"}, "a replay sends under a new generation"
    # The unknown outcome of each timed-out send was looked up before the replay sent it.
    for message in Message.objects.filter(pk__in=expected):
        outcomes = [a.outcome for a in message.attempts.order_by("number")]
        assert outcomes[-2:] == ["not_found_at_provider", "accepted"], outcomes

    again = manage_json(live, *command)
    assert (again["matched"], again["replayed"]) == (0, 0)
    still_parked = set(DeadLetter.objects.filter(replayed_at__isnull=True).values_list("pk", flat=True))
    assert still_parked == parked_before - {d.pk for d in dead_letters if str(d.message_id) in expected}
    assert sum(Message.objects.filter(pk__in=expected).values_list("send_generation", flat=True)) == 20
    assert accepted_per_message(live) == sent


def test_two_replays_at_the_same_moment_from_the_api_and_the_command_send_each_message_once(live, key, park):
    count = 300
    now = timezone.now()
    dead_letters = [
        park(priority="bulk", to=f"+1415557{n:04d}", body=f"race {n}", parked_at=now - timedelta(seconds=n))
        for n in range(count)
    ]
    ids = [str(d.message_id) for d in dead_letters]
    command = subprocess.Popen(
        [PYTHON, "manage.py", "replay_dead_letters", "--channel", "sms", "--yes", "--json"],
        cwd=REPO,
        env=live.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    api_result: dict = {}
    try:
        # Fire the API's replay the moment the command has started replaying: both then work
        # through the same dead letters at once.
        wait_until(lambda: DeadLetter.objects.filter(replayed_via="command").exists(), 60, interval=0.005)

        def call_api():
            response = live.api(key).post(f"{live.web_url}/api/v1/dead-letters/replay/", json={"channel": "sms"})
            api_result["status"], api_result["body"] = response.status_code, response.json()

        caller = threading.Thread(target=call_api)
        caller.start()
        stdout, stderr = command.communicate(timeout=120)
        caller.join(60)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, stderr
    by_command = json.loads(stdout)
    assert api_result["status"] == 200, api_result
    by_api = api_result["body"]
    print(f"replayed by the command: {by_command['replayed']}, by the API: {by_api['replayed']}")
    assert by_command["replayed"] + by_api["replayed"] == count
    assert not set(by_command["message_ids"]) & set(by_api["message_ids"])
    assert by_api["replayed"] > 0 and by_command["replayed"] > 0, "the two replays did not overlap"
    assert Counter(DeadLetter.objects.values_list("replayed_via", flat=True)) == {
        "command": by_command["replayed"],
        "api": by_api["replayed"],
    }

    final = wait_for_all(ids, {"delivered"}, timeout=120)
    assert final == {"delivered": count}
    sent = accepted_per_message(live)
    assert set(sent) == set(ids) and set(sent.values()) == {1}, "a message was sent twice"
    assert set(Message.objects.filter(pk__in=ids).values_list("send_generation", flat=True)) == {2}
