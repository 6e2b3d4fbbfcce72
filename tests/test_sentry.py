"""Sentry: a bug in a task is reported, a provider refusing a message is not, and no personal
data is sent. The client is started as settings start it, with a transport that keeps envelopes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sentry_sdk
from sentry_sdk.transport import Transport

from conductor_project.sentry import sentry_init
from messaging.tasks import dispatch

SENT: list = []
# Kept away from the test's own lines: Sentry's source context quotes the code around a frame.
RECIPIENT, BODY = "+14155559876", "secret code 424242"


class KeepEnvelopes(Transport):
    def capture_envelope(self, envelope) -> None:
        SENT.append(envelope)


def error_events() -> list[dict]:
    events = [envelope.get_event() for envelope in SENT]
    return [event for event in events if event and event.get("level") in ("error", "fatal")]


@pytest.fixture
def sentry():
    SENT.clear()
    sentry_init(dsn="http://public@127.0.0.1:9/1", transport=KeepEnvelopes)
    yield
    sentry_sdk.flush(timeout=2)
    sentry_sdk.init()  # no DSN: the client is off again for every other test


@pytest.fixture
def single_provider(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {**settings.CONDUCTOR["ROUTES"], "sms": ["twilio"]}}


@pytest.mark.django_db
def test_a_permanent_provider_error_is_an_outcome_not_a_sentry_error(sentry, sandbox, single_provider, make_message):
    message = make_message(to="+1234")  # the sandbox refuses it with Twilio's 21211
    dispatch.apply(args=[str(message.pk)])
    sentry_sdk.flush(timeout=2)
    message.refresh_from_db()
    assert message.state == "failed" and message.last_error_type == "invalid_recipient"
    assert error_events() == []


@pytest.mark.django_db
def test_a_bug_in_a_task_is_reported_without_personal_data(sentry, monkeypatch, make_message):
    message = make_message(to=RECIPIENT, body=BODY)

    def broken(*, message_ids):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("messaging.tasks.messages_dispatch", broken)
    dispatch.apply(args=[str(message.pk)])
    sentry_sdk.flush(timeout=2)
    [event] = error_events()
    [exception] = event["exception"]["values"]
    assert exception["type"] == "ZeroDivisionError"
    assert event["transaction"] == "messaging.dispatch" or "messaging.dispatch" in str(event.get("extra"))
    assert "user" not in event or "ip_address" not in event.get("user", {})
    serialised = str(event)
    assert RECIPIENT not in serialised and BODY not in serialised and message.to not in serialised


def test_settings_start_sentry_only_with_a_dsn_and_without_pii():
    probe = (
        "import django, sentry_sdk; django.setup(); c = sentry_sdk.get_client();"
        "print(c.is_active(), c.should_send_default_pii(),"
        " sorted(i for i in c.integrations if i in ('django', 'celery')))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "conductor_project.settings.test"}
    with_dsn = subprocess.run(
        [sys.executable, "-c", probe], env={**env, "SENTRY_DSN": "http://public@127.0.0.1:9/1"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert with_dsn.stdout.strip() == "True False ['celery', 'django']"
    env.pop("SENTRY_DSN", None)
    without = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert without.stdout.strip().startswith("False")
