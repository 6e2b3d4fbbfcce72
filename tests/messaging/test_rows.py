"""Writing many rows at once: UPDATE with each row's values, COPY of new rows (real PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from messaging.models import Message, MessageEvent
from messaging.rows import rows_insert, rows_update, rows_update_in_key_order

pytestmark = pytest.mark.django_db


def test_rows_update_gives_each_row_its_values_and_keeps_the_filter(make_message):
    a, b, c = (make_message(priority="bulk") for _ in range(3))
    Message.objects.filter(pk=c.pk).update(state="cancelled")
    changes = {pk: {"provider": "twilio", "provider_message_id": f"SM{i}"} for i, pk in enumerate([a.pk, b.pk, c.pk])}
    assert rows_update(Message.objects.filter(state="accepted"), changes) == 2
    refs = dict(Message.objects.values_list("pk", "provider_message_id"))
    assert (refs[a.pk], refs[b.pk], refs[c.pk]) == ("SM0", "SM1", "")
    with pytest.raises(ValueError):
        rows_update(Message.objects.all(), {a.pk: {"provider": "x"}, b.pk: {"state": "accepted"}})


def test_rows_update_carries_each_type_through_its_json_parameter_unchanged(make_message):
    a, b = make_message(priority="bulk"), make_message(priority="bulk")
    moment = timezone.now().replace(microsecond=123456)
    changes = {
        a.pk: {
            "dispatched_at": moment,
            "attempt_count": 7,
            "needs_provider_lookup": True,
            "fallback_channels": ["email", "whatsapp"],
            "body": 'quote " backslash \\ and é, ✓',
        },
        b.pk: {
            "dispatched_at": None,
            "attempt_count": 0,
            "needs_provider_lookup": False,
            "fallback_channels": [],
            "body": "{not, an array}",
        },
    }
    assert rows_update(Message.objects.all(), changes) == 2
    for pk, fields in changes.items():
        stored = Message.objects.values(*fields).get(pk=pk)
        assert stored == fields


def test_the_any_lookup_matches_what_in_matches_with_one_parameter(make_message, django_assert_num_queries):
    from django.db import connection

    messages = [make_message(priority="bulk") for _ in range(5)]
    keys = [m.pk for m in messages[:3]] + [None, str(messages[3].pk), uuid.uuid4()]
    expected = {m.pk for m in messages[:4]}
    assert set(Message.objects.filter(pk__any=keys).values_list("pk", flat=True)) == expected
    assert set(Message.objects.filter(pk__in=keys).values_list("pk", flat=True)) == expected
    sql, params = Message.objects.filter(pk__any=keys).values("pk").query.sql_with_params()
    if connection.vendor == "postgresql":
        assert "= ANY(%s::uuid[])" in sql and len(params) == 1
    # a related field, as the attempts' look-up by message uses it
    MessageEvent.objects.bulk_create(
        MessageEvent(message=m, created_at=timezone.now(), source="api", to_state="accepted") for m in messages
    )
    found = MessageEvent.objects.filter(message_id__any=[m.pk for m in messages[:2]]).values_list(
        "message_id", flat=True
    )
    assert sorted(found) == sorted(m.pk for m in messages[:2])
    # nothing to match: no query at all, as with __in
    with django_assert_num_queries(0):
        assert list(Message.objects.filter(pk__any=[])) == []
        assert list(Message.objects.filter(pk__any=[None])) == []
    # values that are not bare keys go as IN, quoted one by one
    odd = make_message(priority="bulk", to="+1,2}")
    assert list(Message.objects.filter(to__any=["+1,2}", "x"]).values_list("pk", flat=True)) == [odd.pk]


def test_rows_update_with_one_value_for_every_row_is_a_plain_update(make_message):
    a, b = make_message(priority="bulk"), make_message(priority="bulk")
    now = timezone.now()
    assert rows_update(Message.objects.all(), {a.pk: {"dispatched_at": now}, b.pk: {"dispatched_at": now}}) == 2
    assert set(Message.objects.values_list("dispatched_at", flat=True)) == {now}


def test_rows_insert_stores_every_field_as_bulk_create_would(client_key):
    now = timezone.now()
    messages = [
        Message(
            id=uuid.uuid4(),
            client=client_key[0],
            channel="sms",
            to=f"+141555500{i:02d}",
            body=f"hello {i}\ttab, newline\n and a backslash \\",
            priority="bulk",
            expires_at=now + timedelta(hours=1),
            created_at=now,
            accepted_at=now,
            metadata={"campaign": "spring", "n": i, "nested": {"ok": True}},
            fallback_channels=["email"],
            fallback_to={"email": f"user{i}@example.com"},
        )
        for i in range(3)
    ]
    rows_insert(Message, messages)
    rows_insert(
        MessageEvent, [MessageEvent(message=m, created_at=now, source="api", to_state="accepted") for m in messages]
    )
    for original in messages:
        stored = Message.objects.get(pk=original.pk)
        assert (stored.body, stored.metadata, stored.fallback_to) == (
            original.body,
            original.metadata,
            original.fallback_to,
        )
        assert stored.fallback_channels == ["email"] and stored.state == "accepted" and stored.updated_at
        assert stored.events.get().to_state == "accepted"
    assert not messages[0]._state.adding


def test_rows_insert_raises_djangos_integrity_error_and_stores_nothing(make_message):
    existing = make_message(priority="bulk")
    clash = Message(
        id=existing.pk,
        client=existing.client,
        channel="sms",
        to="+14155550000",
        body="dup",
        expires_at=existing.expires_at,
        created_at=existing.created_at,
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        rows_insert(Message, [clash])
    assert Message.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_many_row_update_locks_in_key_order_whatever_order_its_plan_reads(make_message, other_session):
    """The deadlock of overlapping batches, one step short: another transaction holds the row with
    the lower key; the writer must not take the higher one meanwhile. Its plan is forced to read
    the higher first (stored first, sequential scan), as a bitmap scan can."""
    import threading
    import time

    high = make_message(id=uuid.UUID(int=2**128 - 1), priority="bulk")  # stored first
    low = make_message(id=uuid.UUID(int=1), priority="bulk")
    holder, prober = other_session(), other_session()
    updated: list[int] = []
    writer_pid: list[int] = []

    def write() -> None:
        from django.db import connection as thread_connection

        try:
            with thread_connection.cursor() as cursor:
                cursor.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")
                writer_pid.append(thread_connection.connection.info.backend_pid)
            updated.append(
                rows_update_in_key_order(Message.objects.filter(pk__in=[high.pk, low.pk]), provider="twilio")
            )
        finally:
            thread_connection.close()

    writer = threading.Thread(target=write)
    try:
        holder.execute("SELECT 1 FROM messaging_message WHERE id = %s FOR UPDATE", [low.pk])
        writer.start()
        deadline = timezone.now() + timedelta(seconds=10)
        while timezone.now() < deadline:  # until the writer waits for a lock
            waiting = prober.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) AND wait_event_type = 'Lock'",
                [writer_pid],
            ).fetchone()[0]
            prober.rollback()
            if waiting:
                break
            time.sleep(0.02)
        assert waiting, "the writer never waited for the held row"
        # The writer holds nothing yet: the higher row is free to take.
        prober.execute("SELECT 1 FROM messaging_message WHERE id = %s FOR UPDATE NOWAIT", [high.pk])
        prober.rollback()
    finally:
        holder.rollback()
        writer.join(timeout=10)
    assert updated == [2]
    assert set(Message.objects.values_list("provider", flat=True)) == {"twilio"}
