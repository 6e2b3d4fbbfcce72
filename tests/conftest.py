"""Shared fixtures: API clients and keys, a clean Redis, and the live stack for integration tests."""

from __future__ import annotations

import pytest
import redis
from django.conf import settings
from rest_framework.test import APIClient

from messaging.services import api_key_create


@pytest.fixture(scope="session", autouse=True)
def _flush_survives_a_deadlock():
    """Transactional tests end with a TRUNCATE of every table while the live stack's beat and
    workers may still be writing: PostgreSQL can pick the TRUNCATE as a deadlock victim. Retry it
    (the stack's transactions are short) instead of failing a test that passed."""
    import time

    from django.core.management.base import CommandError
    from django.core.management.commands import flush

    original = flush.Command.handle

    def handle(self, **options):
        for attempt in range(5):
            try:
                return original(self, **options)
            except CommandError as exc:
                if "deadlock detected" not in str(exc.__cause__) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    flush.Command.handle = handle
    yield
    flush.Command.handle = original


@pytest.fixture(scope="session", autouse=True)
def _clean_redis():
    """Tests own Redis databases 14 (state) and 15 (broker): start them empty, whatever ran before."""
    for url in (settings.REDIS_URL, settings.CELERY_BROKER_URL):
        redis.Redis.from_url(url).flushdb()


@pytest.fixture(autouse=True)
def _fresh_provider_state():
    """Circuit and rate-limit state lives in Redis and in per-process caches: start every test clean."""
    from providers.guards import reset_guards
    from providers.redis_state import reset_shared_redis

    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    reset_guards()
    reset_shared_redis()
    yield
    reset_guards()


@pytest.fixture(autouse=True)
def _no_routes_cached(monkeypatch):
    """Provider routes (messaging.route_health) are cached per process for a few seconds: a test
    must neither see another's rolled-back routes nor pay a query at a moment that depends on the
    clock (tests count queries). Each test starts with "none, just read"; provider_route_set
    clears the cache, so a test that sets routes reads them once, at its next claim."""
    from messaging import route_health

    monkeypatch.setattr(route_health, "ROUTE_CACHE_SECONDS", float("inf"))
    route_health._cache.states, route_health._cache.loaded_at = {}, 0.0
    yield
    route_health._cache.states, route_health._cache.loaded_at = {}, 0.0


@pytest.fixture
def other_session():
    """Open psycopg connections of their own to the test database: another process's session
    (a lock holder, a prober). Whatever a test leaves open is closed after it."""
    import psycopg
    from django.db import connection

    opened = []

    def connect(**options):
        params = connection.get_connection_params()
        fields = {k: v for k, v in params.items() if k in ("host", "port", "user", "dbname", "password")}
        opened.append(psycopg.connect(**fields, **options))
        return opened[-1]

    yield connect
    for session in opened:
        session.close()


@pytest.fixture
def client_key(db):
    """(ApiClient, raw key) for a fresh client."""
    key, raw = api_key_create(client_name="acme")
    return key.client, raw


@pytest.fixture
def make_message(client_key):
    """Create an accepted message row directly (no task published), overriding any field."""
    from datetime import timedelta

    from django.utils import timezone

    from messaging.models import Message

    def make(**fields):
        now = timezone.now()
        values = {
            "client": client_key[0],
            "channel": "sms",
            "to": "+14155552671",
            "body": "code 1",
            "priority": "critical",
            "expires_at": now + timedelta(minutes=5),
            "created_at": now,
            "accepted_at": now,
            "enqueued_at": now,
        }
        values.update(fields)
        return Message.objects.create(**values)

    return make


@pytest.fixture
def api(client_key) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {client_key[1]}")
    return client


@pytest.fixture
def other_api(db) -> APIClient:
    _, raw = api_key_create(client_name="globex")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture(scope="session")
def stack(django_db_setup, django_db_blocker):
    """Sandbox, web, one worker and beat as real processes on the test database (started once)."""
    from tests.support.stack import Stack

    stack = Stack(settings.DATABASES["default"]["NAME"])
    try:
        stack.start(workers=1)
    except Exception:
        stack.stop()
        print(stack.logs())
        raise
    STARTED_STACKS.append(stack)
    yield stack
    STARTED_STACKS.remove(stack)
    stack.stop()


# The session's live stack, once a test started it (it stays up for later tests).
STARTED_STACKS: list = []


def stop_session_stack_workers() -> None:
    """The live stack's workers, if the session started it, would take another stack's or test's
    callbacks and messages too (its beat sweeps the same rows every second): stopped; the next
    `live` test starts them again."""
    for stack in STARTED_STACKS:
        stack.replace_workers(count=0)


@pytest.fixture
def no_stack_workers():
    """For a test that runs workers of its own on the test database (stop_session_stack_workers)."""
    stop_session_stack_workers()
    yield


@pytest.fixture
def no_stack_beat():
    """For a test that runs a beat of its own on the test database: the live stack's beat, if the
    session started it, would record the same periodic jobs' heartbeats. It is stopped for the
    test and started again after it."""
    paused = list(STARTED_STACKS)
    for stack in paused:
        stack.stop_beat()
    yield
    for stack in paused:
        stack.start_beat()


@pytest.fixture
def live(stack, transactional_db, request):
    """The stack with a reset sandbox and its workers: one with default settings, or what the
    test's `workers` mark asks for (kept from the previous test when that asked the same: each
    start costs seconds). Prints process logs if the test failed."""
    yield from serve_live(stack, request)


def serve_live(stack, request):
    """The `live` fixture's body, for a module that overrides `live` with a stack of its own
    (tests/integration/test_rabbitmq_guarantees.py: the same tests on a RabbitMQ broker)."""
    stack.sandbox_reset()
    stack.state_redis().flushdb()  # circuits and rate limits start closed and full
    mark = request.node.get_closest_marker("workers")
    count, concurrency = (mark.kwargs["count"], mark.kwargs["concurrency"]) if mark else (1, 4)
    if not stack.workers_are(count, concurrency):
        stack.replace_workers(count=count, concurrency=concurrency)
    yield stack
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(stack.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def sandbox_server():
    """The sandbox provider served in a thread of the test process (real HTTP on loopback)."""
    from providers.sandbox.app import start_background
    from providers.sandbox.settings import sandbox_config_from_settings

    server = start_background(sandbox_config_from_settings(seed=3))
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server, settings):
    """Point the Twilio adapter at the in-process sandbox, reset between tests."""
    import requests as http

    from providers.registry import reset_provider_cache

    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    for name in ("twilio", "vonage", "mailgun"):
        providers[name]["BASE_URL"] = sandbox_server.url
    settings.CONDUCTOR_PROVIDERS = providers
    settings.ANYMAIL = {**settings.ANYMAIL, "MAILGUN_API_URL": f"{sandbox_server.url}/v3"}
    reset_provider_cache()
    http.post(f"{sandbox_server.url}/_sandbox/reset", json={}, timeout=5).raise_for_status()

    class Control:
        url = sandbox_server.url

        def faults(self, provider="twilio", **faults):
            response = http.post(f"{self.url}/_sandbox/faults", json={"provider": provider, **faults}, timeout=5)
            response.raise_for_status()

        def requests(self, **filters):
            return http.get(f"{self.url}/_sandbox/requests", params=filters, timeout=5).json()["requests"]

    yield Control()
    reset_provider_cache()


@pytest.fixture
def park(make_message):
    """Give up on a new message through the transition service, which parks its dead letter.

    park(state="dead_lettered", error_type="provider_5xx", provider="twilio", attempts=1,
    outcome="transient_error", parked_at=None, **message_fields) -> DeadLetter
    """
    from django.utils import timezone

    from messaging.models import DeadLetter, DispatchAttempt, EventSource, Message
    from messaging.services import message_transition

    def give_up(
        state="dead_lettered",
        error_type="provider_5xx",
        error_code="",
        provider="twilio",
        attempts=1,
        outcome="transient_error",
        parked_at=None,
        **fields,
    ):
        message = make_message(**fields)
        now = timezone.now()
        for number in range(1, attempts + 1):
            DispatchAttempt.objects.create(
                message=message,
                number=number,
                send_generation=message.send_generation,
                provider=provider,
                channel=message.channel,
                started_at=now,
                ended_at=now,
                outcome=outcome,
                error_type=error_type,
                error_code=error_code,
                latency_ms=120,
            )
        Message.objects.filter(pk=message.pk).update(attempt_count=attempts, provider=provider if attempts else "")
        assert message_transition(
            message_id=message.pk,
            to_state=state,
            source=EventSource.WORKER,
            detail="given up in a test",
            fields={
                "last_error_type": error_type,
                "last_error_code": error_code,
                "last_error_message": f"{error_type} in a test",
            },
        )
        dead_letter = DeadLetter.objects.get(message=message, send_generation=message.send_generation)
        if parked_at is not None:
            DeadLetter.objects.filter(pk=dead_letter.pk).update(created_at=parked_at)
            dead_letter.refresh_from_db()
        return dead_letter

    return give_up
