"""Writing many rows at once: UPDATE with each row's values, COPY of new rows (real PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from messaging.models import Message, MessageEvent
from messaging.rows import rows_insert, rows_update

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
