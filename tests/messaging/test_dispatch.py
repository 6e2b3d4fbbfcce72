"""The send path's decisions, run in-process against the sandbox over real HTTP (no broker needed:
these tests run inside a transaction, so the only worker that can see their rows is this one)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.models import AttemptOutcome, DispatchAttempt, Message
from providers.registry import reset_provider_cache

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def single_provider_routes(settings):
    """One provider per channel, so these tests see the retry policy rather than fallback."""
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio"], "whatsapp": ["twilio"], "email": ["smtp"]},
    }


def outcomes(message):
    return list(message.attempts.order_by("number").values_list("outcome", flat=True))


def test_a_send_is_recorded_as_an_attempt_and_dispatches_the_message(sandbox, make_message):
    message = make_message()
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched" and message.provider == "twilio"
    assert message.lease_expires_at is None and message.next_attempt_at is None
    attempt = message.attempts.get()
    assert attempt.outcome == "accepted" and attempt.latency_ms is not None and attempt.ended_at
    assert attempt.provider_message_id == message.provider_message_id
    [sent] = sandbox.requests(message_id=str(message.pk))
    assert sent["token"] == f"{message.pk}.1"


def test_a_leased_message_is_not_sent_by_a_second_task(sandbox, make_message):
    message = make_message(lease_expires_at=timezone.now() + timedelta(seconds=30))
    messages_dispatch(message_ids=[str(message.pk)])
    assert sandbox.requests() == [] and not message.attempts.exists()


def test_a_retry_that_is_not_due_yet_is_not_sent_early(sandbox, make_message):
    message = make_message(next_attempt_at=timezone.now() + timedelta(seconds=30))
    messages_dispatch(message_ids=[str(message.pk)])
    assert sandbox.requests() == []


def test_a_message_past_its_deadline_expires_without_reaching_the_provider(sandbox, make_message):
    message = make_message(expires_at=timezone.now() - timedelta(seconds=1))
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "expired" and message.last_error_type == "expired"
    assert sandbox.requests() == []


def test_a_permanent_rejection_fails_at_once(sandbox, make_message):
    message = make_message(to="+1234")  # the provider refuses it with 21211
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "failed"
    assert (message.last_error_type, message.last_error_code) == ("invalid_recipient", "21211")
    assert outcomes(message) == ["permanent_error"]


def test_a_5xx_schedules_a_jittered_retry_within_the_cap(sandbox, make_message):
    sandbox.faults(error_rate=1.0)
    message = make_message()
    before = timezone.now()
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "accepted" and message.attempt_count == 1
    assert message.last_error_type == "provider_5xx"
    assert before <= message.next_attempt_at <= before + timedelta(seconds=1.5)  # critical: random(0, 1 s)
    assert message.enqueued_at == message.next_attempt_at  # published with a countdown
    assert message.lease_expires_at is None


def test_a_429_honours_retry_after(sandbox, make_message):
    sandbox.faults(rate_429=1.0)
    message = make_message()
    before = timezone.now()
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.last_error_type == "rate_limited"
    assert message.next_attempt_at >= before + timedelta(seconds=1)  # the sandbox says Retry-After: 1


def test_retry_delays_beyond_a_minute_are_left_to_the_sweeper(sandbox, make_message, settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "CATEGORY_POLICIES": {"slow": {"base_seconds": 1e6, "cap_seconds": 1e6}},
    }
    sandbox.faults(error_rate=1.0)
    message = make_message(priority="bulk", category="slow", expires_at=timezone.now() + timedelta(days=30))
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.next_attempt_at > timezone.now() + timedelta(seconds=60)
    assert message.enqueued_at is None  # no countdown over 60 s: the sweeper enqueues it when due


def test_retries_stop_at_the_deadline(sandbox, make_message, settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "CATEGORY_POLICIES": {"slow": {"base_seconds": 1e6, "cap_seconds": 1e6}},
    }
    sandbox.faults(error_rate=1.0)
    deadline = timezone.now() + timedelta(seconds=20)
    message = make_message(category="slow", expires_at=deadline)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.next_attempt_at == deadline


def test_exhausted_retries_dead_letter_the_message_with_its_last_error(sandbox, make_message):
    sandbox.faults(outage=True)
    message = make_message(failed_rounds=5)  # critical allows 6
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dead_lettered" and message.failed_rounds == 6
    assert message.last_error_type == "provider_5xx" and "6 rounds of attempts failed" in message.last_error_message


def test_a_message_that_keeps_killing_its_worker_is_dead_lettered_not_looped(sandbox, make_message):
    message = make_message()
    for number in (1, 2, 3):  # three workers died mid-send
        DispatchAttempt.objects.create(message=message, number=number, provider="twilio", started_at=timezone.now())
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dead_lettered" and message.last_error_type == "worker_lost"
    assert outcomes(message) == ["worker_lost"] * 3
    assert sandbox.requests() == []


def test_a_lost_attempt_is_looked_up_and_not_resent_when_the_provider_has_it(sandbox, make_message):
    message = make_message()
    messages_dispatch(message_ids=[str(message.pk)])  # accepted by the provider...
    message.refresh_from_db()
    sid = message.provider_message_id
    # ...but pretend the worker died before recording it.
    Message.objects.filter(pk=message.pk).update(state="accepted", provider_message_id="", dispatched_at=None)
    DispatchAttempt.objects.filter(message=message).update(outcome=AttemptOutcome.IN_PROGRESS, provider_message_id="")
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched" and message.provider_message_id == sid
    assert outcomes(message) == ["worker_lost", "found_at_provider"]
    assert len(sandbox.requests(message_id=str(message.pk))) == 1


class _Killed(BaseException):
    """The worker's death (SIGKILL): no `except Exception` catches it, nothing after it runs."""


def _dies_at_write(number: int):
    """An execute wrapper that kills the worker at its `number`-th write (from 0); after that every
    statement dies too, but savepoints roll back, as the database does for a dead session."""
    writes, dead = 0, False

    def wrapper(execute, sql, params, many, context):
        nonlocal writes, dead
        statement = sql.lstrip().upper()
        if statement.startswith(("SAVEPOINT", "RELEASE", "ROLLBACK")):
            return execute(sql, params, many, context)
        if dead:
            raise _Killed
        if statement.startswith(("UPDATE", "INSERT", "COPY", "DELETE", "WITH")):
            if writes == number:
                dead = True
                raise _Killed
            writes += 1
        return execute(sql, params, many, context)

    return wrapper


def _dispatch_killed_at(message, write: int) -> bool:
    """One dispatch of the message by a worker killed at its `write`-th write; then its lease runs out.
    Returns whether the kill landed (False: the dispatch had fewer writes and ended normally)."""
    from django.db import connection

    try:
        with connection.execute_wrapper(_dies_at_write(write)):
            messages_dispatch(message_ids=[str(message.pk)])
    except _Killed:
        Message.objects.filter(pk=message.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        return True
    return False


@pytest.mark.django_db(transaction=True)  # each write commits on its own, as in a worker
def test_a_worker_killed_at_any_write_after_finding_a_lost_attempt_still_looks_it_up(sandbox, make_message):
    """Closing the lost attempt and flagging the look-up are one transaction: killed between the
    two, the next claim saw neither and sent again (the chaos test's duplicate)."""
    for write in range(20):
        message = make_message(body=f"code {write}")
        messages_dispatch(message_ids=[str(message.pk)])  # accepted by the provider...
        message.refresh_from_db()
        sid = message.provider_message_id
        # ...but the worker died before recording it.
        Message.objects.filter(pk=message.pk).update(state="accepted", provider_message_id="", dispatched_at=None)
        DispatchAttempt.objects.filter(message=message).update(outcome=AttemptOutcome.IN_PROGRESS)
        killed = _dispatch_killed_at(message, write)
        messages_dispatch(message_ids=[str(message.pk)])
        message.refresh_from_db()
        assert (message.state, message.provider_message_id) == ("dispatched", sid), (write, outcomes(message))
        assert len(sandbox.requests(message_id=str(message.pk))) == 1, (write, outcomes(message))
        if not killed:
            break
    assert not killed and write > 2  # every write of the look-up's claim was a kill point


@pytest.mark.django_db(transaction=True)  # each write commits on its own, as in a worker
def test_a_worker_killed_at_any_write_after_an_ambiguous_send_still_looks_it_up(sandbox, make_message, settings):
    """The look-up flag is written before the ambiguous attempt leaves "in progress"."""
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"]["TIMEOUT_SECONDS"] = 0.3
    settings.CONDUCTOR_PROVIDERS = providers
    reset_provider_cache()
    for write in range(20):
        sandbox.faults("twilio", timeout_rate=1.0, timeout_hold_ms=1000)
        message = make_message(body=f"code {write}")
        killed = _dispatch_killed_at(message, write)
        sandbox.faults("twilio", timeout_rate=0.0)
        Message.objects.filter(pk=message.pk).update(next_attempt_at=None)  # its retry is due
        messages_dispatch(message_ids=[str(message.pk)])
        message.refresh_from_db()
        [accepted] = sandbox.requests(message_id=str(message.pk))  # the ambiguous send, and no other
        assert message.state == "dispatched", (write, outcomes(message))
        assert message.provider_message_id == accepted["provider_message_id"], (write, outcomes(message))
        if not killed:
            break
    assert not killed and write > 2


def test_a_look_up_ignores_a_provider_message_that_belongs_to_another_message(sandbox, make_message):
    first = make_message()
    messages_dispatch(message_ids=[str(first.pk)])
    twin = make_message(needs_provider_lookup=True)  # same recipient and body, never sent
    messages_dispatch(message_ids=[str(twin.pk)])
    twin.refresh_from_db()
    first.refresh_from_db()
    assert twin.provider_message_id != first.provider_message_id
    assert outcomes(twin) == ["not_found_at_provider", "accepted"]
    assert len(sandbox.requests(message_id=str(twin.pk))) == 1


def test_an_empty_look_up_is_not_trusted_until_the_providers_records_settle(sandbox, make_message, settings):
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"]["LOOKUP_SETTLE_SECONDS"] = 60
    settings.CONDUCTOR_PROVIDERS = providers
    reset_provider_cache()
    message = make_message(needs_provider_lookup=True)
    DispatchAttempt.objects.create(
        message=message,
        number=1,
        provider="twilio",
        started_at=timezone.now(),
        ended_at=timezone.now(),
        outcome=AttemptOutcome.AMBIGUOUS,
    )
    Message.objects.filter(pk=message.pk).update(attempt_count=1)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "accepted" and message.needs_provider_lookup
    assert message.last_error_code == "lookup_unsettled"
    assert sandbox.requests() == []  # not resent while the look-up could still be catching up
    DispatchAttempt.objects.filter(message=message).update(ended_at=timezone.now() - timedelta(seconds=61))
    Message.objects.filter(pk=message.pk).update(next_attempt_at=None)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched" and len(sandbox.requests()) == 1


def test_an_unknown_outcome_at_a_provider_without_look_up_is_dead_lettered_not_resent(make_message, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {**settings.CONDUCTOR["ROUTES"], "email": ["smtp"]}}
    message = make_message(channel="email", to="ada@example.com", subject="hi", needs_provider_lookup=True)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dead_lettered" and message.last_error_code == "no_lookup"
    assert "cannot be asked" in message.last_error_message


def test_a_look_up_that_fails_leaves_the_outcome_unknown_and_sends_nothing(sandbox, make_message):
    sandbox.faults("twilio", outage=True)  # the provider cannot be asked either
    message = make_message(needs_provider_lookup=True)
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "accepted" and message.needs_provider_lookup and message.next_attempt_at
    assert outcomes(message) == ["ambiguous"]
    assert sandbox.requests(accepted="true") == []


def test_a_retry_is_not_scheduled_for_a_message_a_receipt_moved_on_during_the_call(make_message):
    from messaging.outcomes import message_schedule_retry
    from providers.types import AmbiguousProviderError

    # The worker timed out waiting for the provider while the provider's receipt already arrived.
    message = make_message(state="delivered", lease_expires_at=timezone.now() + timedelta(seconds=30))
    message_schedule_retry(
        message=message, error=AmbiguousProviderError("timed out", error_type="provider_timeout"), ambiguous=True
    )
    message.refresh_from_db()
    assert message.state == "delivered" and message.lease_expires_at is None
    assert message.next_attempt_at is None and message.last_error_type == "" and not message.needs_provider_lookup


def test_with_the_shared_state_redis_unreachable_sends_go_on(sandbox, make_message, settings):
    from providers.guards import reset_guards
    from providers.redis_state import reset_shared_redis

    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"]["RATE_LIMIT_PER_SECOND"] = 5  # so the limiter, too, has to ask Redis
    settings.CONDUCTOR_PROVIDERS = providers
    reset_shared_redis()
    reset_guards()
    reset_provider_cache()
    try:
        message = make_message()
        messages_dispatch(message_ids=[str(message.pk)])
        message.refresh_from_db()
        assert message.state == "dispatched"  # circuit and rate limit fail open, never block a send
    finally:
        reset_shared_redis()


# Statements one critical message costs from claim to dispatched (savepoints included: the tests
# run inside a transaction). The urgent path's latency is a benchmark target: no extra round trips.
# 13 since issue 22: the claim's suppression look-up (SuppressionIndex), one indexed query.
CRITICAL_SEND_STATEMENTS = 13


def test_one_critical_message_costs_a_fixed_number_of_statements(sandbox, make_message):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    message = make_message(priority="critical")
    with CaptureQueriesContext(connection) as queries:
        messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    assert message.state == "dispatched"
    assert len(queries) == CRITICAL_SEND_STATEMENTS, "\n".join(q["sql"][:120] for q in queries)
