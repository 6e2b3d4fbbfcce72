"""The sweeper: expires overdue messages, re-publishes lost or due ones, leaves the rest alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import Message
from messaging.sweeper import messages_sweep
from tests.support.processes import wait_until

pytestmark = pytest.mark.django_db


def test_overdue_accepted_messages_expire(make_message):
    overdue = make_message(expires_at=timezone.now() - timedelta(seconds=1))
    leased = make_message(
        expires_at=timezone.now() - timedelta(seconds=1), lease_expires_at=timezone.now() + timedelta(seconds=30)
    )
    report = messages_sweep()
    assert report.expired == 1
    assert Message.objects.get(pk=overdue.pk).state == "expired"
    assert Message.objects.get(pk=leased.pk).state == "accepted"  # its worker decides


def test_messages_whose_task_is_stale_or_missing_are_published_again(make_message, settings):
    now = timezone.now()
    stale = make_message(enqueued_at=now - timedelta(seconds=60))
    never = make_message(enqueued_at=None)
    fresh = make_message(enqueued_at=now - timedelta(seconds=1))
    not_due = make_message(enqueued_at=None, next_attempt_at=now + timedelta(minutes=5))
    leased = make_message(enqueued_at=None, lease_expires_at=now + timedelta(seconds=30))
    dispatched = make_message(enqueued_at=None, state="dispatched")
    report = messages_sweep(now=now)
    assert report.enqueued == 2
    swept = set(Message.objects.filter(enqueued_at=now).values_list("pk", flat=True))
    assert swept == {stale.pk, never.pk}
    assert Message.objects.get(pk=fresh.pk).enqueued_at == fresh.enqueued_at
    for untouched in (not_due, leased, dispatched):
        assert Message.objects.get(pk=untouched.pk).enqueued_at is None


def test_a_due_retry_is_published(make_message):
    now = timezone.now()
    due = make_message(enqueued_at=None, next_attempt_at=now - timedelta(seconds=1), priority="bulk")
    assert messages_sweep(now=now).enqueued == 1
    assert Message.objects.get(pk=due.pk).enqueued_at == now


def test_stale_thresholds_are_per_priority(make_message):
    now = timezone.now()
    make_message(priority="bulk", enqueued_at=now - timedelta(seconds=6))  # bulk waits 10 s in tests
    make_message(priority="transactional", enqueued_at=now - timedelta(seconds=6))  # 5 s
    assert messages_sweep(now=now).enqueued == 1


def test_one_tick_publishes_at_most_a_batch_across_its_reads(make_message, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SWEEP_BATCH_SIZE": 3}
    now = timezone.now()
    never = [make_message(enqueued_at=None) for _ in range(2)]
    due_retry = make_message(enqueued_at=None, next_attempt_at=now - timedelta(seconds=1))
    stale = make_message(enqueued_at=now - timedelta(seconds=60))
    assert messages_sweep(now=now).enqueued == 3
    swept = set(Message.objects.filter(enqueued_at=now).values_list("pk", flat=True))
    assert swept == {never[0].pk, never[1].pk, due_retry.pk}
    assert messages_sweep(now=now + timedelta(seconds=1)).enqueued == 1
    assert Message.objects.get(pk=stale.pk).enqueued_at == now + timedelta(seconds=1)


@pytest.mark.parametrize("statistics", ["fresh", "stale"])
def test_a_backlog_queued_moments_ago_is_not_read_at_all(make_message, client_key, statistics):
    """A campaign's accepted rows, each with its task just published, must cost a sweep nothing,
    also before autovacuum has analyzed them (the planner then thinks few rows are accepted)."""
    import json

    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from messaging.rows import rows_insert

    now = timezone.now()
    for _ in range(20):  # the history the statistics see when they are stale
        make_message(state="delivered", priority="bulk")
    if statistics == "stale":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE messaging_message")
    backlog = [
        Message(
            client=client_key[0],
            channel="sms",
            to="+14155552671",
            body="sale",
            priority="bulk",
            expires_at=now + timedelta(hours=1),
            created_at=now,
            accepted_at=now,
            enqueued_at=now,
        )
        for _ in range(3000)
    ]
    rows_insert(Message, backlog)
    if statistics == "fresh":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE messaging_message")
    with CaptureQueriesContext(connection) as captured:
        assert messages_sweep(now=now + timedelta(seconds=1)).enqueued == 0
    # Replayed as the sweep ran them, planner settings (SET LOCAL) included.
    statements = [q["sql"] for q in captured.captured_queries if q["sql"].startswith(("SELECT", "SET", "RESET"))]
    assert any(sql.startswith("SELECT") for sql in statements)
    with connection.cursor() as cursor:
        for sql in statements:
            if not sql.startswith("SELECT"):
                cursor.execute(sql)
                continue
            cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql)
            plan = cursor.fetchone()[0]
            plan = json.loads(plan) if isinstance(plan, str) else plan
            touched = _rows_read(plan[0]["Plan"])
            assert touched < 10, (touched, sql)


def _rows_read(node: dict) -> int:
    """Rows a plan node produced or threw away, summed over the tree."""
    own = node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
    if "Scan" in node["Node Type"]:
        own += node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
    return own + sum(_rows_read(child) for child in node.get("Plans", []))


@pytest.mark.django_db(transaction=True)
def test_a_sweep_cut_off_mid_run_leaves_the_next_tick_free_to_sweep(make_message, other_session):
    """One sweep at a time; its holder is a worker that can be killed mid-sweep (the chaos test
    does). The lock must go with it, not hold every sweep off until some timeout."""
    from messaging.locks import cluster_lock_id
    from messaging.tasks import sweep

    lost = make_message(priority="transactional", enqueued_at=None)  # its task never reached the broker
    holder = other_session(autocommit=True)  # another worker's sweep, under way
    try:
        holder.execute("SELECT pg_advisory_lock(%s)", [cluster_lock_id("conductor:sweep")])
        sweep()
        assert Message.objects.get(pk=lost.pk).enqueued_at is None  # that sweep's turn
    finally:
        holder.close()  # ...and its worker is killed: the connection goes, and the lock with it

    def swept() -> bool:
        sweep()
        return Message.objects.get(pk=lost.pk).enqueued_at is not None

    # The server ends the closed session a moment later (seen: the first sweep still lost the lock
    # on a loaded machine); seconds, not the 120 s the Redis lock held every sweep off.
    wait_until(swept, 5, interval=0.05, what="a sweep once the holder's session ended")


def test_a_backlog_still_draining_is_not_published_again_when_its_stale_time_passes(make_message, settings):
    """A campaign that takes longer than the stale time to drain: while the queue's workers keep
    taking its tasks, those published after the last one they took are still queued."""
    import time

    from messaging.queue_progress import KEY, queue_consumed
    from providers.redis_state import shared_redis

    now = timezone.now()
    stale = settings.CONDUCTOR["SWEEP_STALE_AFTER_SECONDS"]["bulk"]
    taken = make_message(priority="bulk", enqueued_at=now - timedelta(seconds=stale + 60))
    queued = make_message(priority="bulk", enqueued_at=now - timedelta(seconds=stale + 5))
    queue_consumed(queue="sms.bulk", published_at=(now - timedelta(seconds=stale + 30)).timestamp())
    queue_consumed(queue="sms.bulk", published_at=(now - timedelta(seconds=stale + 90)).timestamp())  # a late one
    assert messages_sweep().enqueued == 1
    assert Message.objects.get(pk=taken.pk).enqueued_at > now  # taken (or lost): published again
    assert Message.objects.get(pk=queued.pk).enqueued_at < now  # still in the queue: left alone
    # The workers stop taking tasks (gone, or the broker lost the queue): time alone decides again.
    shared_redis().hset(KEY, "sms.bulk:moved", repr(time.time() - stale - 1))
    assert messages_sweep().enqueued == 1
    assert Message.objects.get(pk=queued.pk).enqueued_at > now


def test_without_a_watermark_or_redis_the_stale_time_alone_decides(make_message, settings):
    from providers import redis_state

    now = timezone.now()
    stale = settings.CONDUCTOR["SWEEP_STALE_AFTER_SECONDS"]["bulk"]
    make_message(priority="bulk", enqueued_at=now - timedelta(seconds=stale + 5))
    assert messages_sweep().enqueued == 1
    make_message(priority="bulk", enqueued_at=now - timedelta(seconds=stale + 5))
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    redis_state.reset_shared_redis()
    try:
        assert messages_sweep().enqueued == 1
    finally:
        redis_state.reset_shared_redis()


def test_a_dispatch_task_raises_its_queues_watermark(make_message):
    from messaging.queue_progress import queues_consumed
    from messaging.tasks import dispatch_batch

    published = timezone.now().timestamp() - 100
    dispatch_batch.apply(args=[[]], headers={"published_at": published}, routing_key="email.bulk")
    marks = queues_consumed(["email.bulk", "sms.bulk"], now=timezone.now().timestamp(), moving_within=5)
    assert marks == {"email.bulk": published}


def test_a_countdown_task_delivered_through_rabbitmqs_delay_exchanges_raises_its_own_queues_watermark():
    """On RabbitMQ a retry's countdown is spelt into its routing key ahead of the queue's name."""
    from kombu.transport.native_delayed_delivery import calculate_routing_key

    from messaging.queue_progress import queue_consumed, queues_consumed

    published = timezone.now().timestamp() - 50
    queue_consumed(queue=calculate_routing_key(30, "sms.critical"), published_at=published)
    marks = queues_consumed(["sms.critical"], now=timezone.now().timestamp(), moving_within=5)
    assert marks == {"sms.critical": published}
