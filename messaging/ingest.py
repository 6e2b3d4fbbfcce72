"""Batch ingest: a batch API request's messages accepted in a few statements, not a few per message."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import Model
from django.utils import timezone

from messaging.models import ApiClient, EventSource, Message, MessageEvent
from messaging.publish import messages_publish
from messaging.rows import rows_insert
from messaging.services import (
    CreateOutcome,
    IdempotencyConflict,
    IdempotencyInFlight,
    idempotency_lock_id,
    message_accepted_log,
    message_columns,
    message_create,
    request_fingerprint,
)
from messaging.states import MessageState


@dataclass(frozen=True)
class BatchItem:
    """One validated item: the serializer's fields without the key, and the idempotency key."""

    fields: dict[str, Any]
    idempotency_key: str | None = None


# Per item: what message_create would have returned for it, or the exception it would have raised.
ItemResult = CreateOutcome | IdempotencyConflict | IdempotencyInFlight


def messages_create_many(
    *, client: ApiClient, items: Sequence[BatchItem], source: str = EventSource.API
) -> list[ItemResult]:
    """Accept validated messages in one transaction; results in the items' order.

    The same rows, event, log line and idempotency answers as message_create item by item, in a
    few statements: the keys' locks in one, the stored keys in one, one INSERT of the messages and
    one of their events, and one publish on commit. A key repeated in the batch behaves as a
    repeated request: the later item replays the first (or conflicts with it). A database error
    is raised and nothing is stored.
    """
    if not items:
        return []
    results: list[ItemResult | None] = [None] * len(items)
    # Ordering-key items take message_create one by one: a sequence number comes from the key's
    # counter row and the message may wait for its predecessor. They are rare in bulk traffic.
    # Items sharing an idempotency key with one of them go the same way, to keep the key in order.
    ordered_keys = {item.idempotency_key for item in items if item.fields.get("ordering_key")} - {None}
    alone = [
        index
        for index, item in enumerate(items)
        if item.fields.get("ordering_key") or item.idempotency_key in ordered_keys
    ]
    together = sorted(set(range(len(items))) - set(alone))
    with transaction.atomic():
        stored = _accept_together(client, items, together, results, source)
        for index in alone:
            results[index] = _accept_alone(client, items[index], source)
        if stored:
            transaction.on_commit(lambda: messages_publish(messages=[(m.id, m.channel, m.priority) for m in stored]))
    return results


def _accept_together(
    client: ApiClient, items: Sequence[BatchItem], indexes: list[int], results: list[ItemResult | None], source: str
) -> list[Message]:
    """Store the items at `indexes` with one INSERT each for messages and events; returns the new rows."""
    keys = {items[index].idempotency_key for index in indexes} - {None}
    busy = _lock_keys(client.pk, keys)
    earlier = _stored_for_keys(client, keys - busy)
    new: list[tuple[int, Message]] = []
    for index in indexes:
        item = items[index]
        fingerprint = request_fingerprint(item.fields)
        key = item.idempotency_key
        if key in busy:
            results[index] = IdempotencyInFlight()
            continue
        first = earlier.get(key)
        if first is None:
            message = _message_row(client, item.fields, key, fingerprint)
            new.append((index, message))
            if key:
                earlier[key] = message  # a later item with the key replays this one
        elif first.request_fingerprint == fingerprint:
            results[index] = CreateOutcome(first, created=False)
        else:
            results[index] = IdempotencyConflict(first)
    try:
        # A savepoint only when a key can collide: without keys no constraint can fail on a new row.
        with transaction.atomic(savepoint=bool(keys)):
            _insert_rows([message for _, message in new], source)
    except IntegrityError:
        if not keys:
            raise
        # Only the idempotency constraint can collide: another request stored one of the keys
        # without our lock (SQLite has none). message_create settles each keyed item on its own.
        new = [(index, message) for index, message in new if message.idempotency_key is None]
        _insert_rows([message for _, message in new], source)
        for index in indexes:
            if items[index].idempotency_key:
                results[index] = _accept_alone(client, items[index], source)
    for index, message in new:
        results[index] = CreateOutcome(message, created=True)
        message_accepted_log(message=message, source=source)
    return [message for _, message in new]


def _accept_alone(client: ApiClient, item: BatchItem, source: str) -> ItemResult:
    try:
        return message_create(client=client, fields=item.fields, idempotency_key=item.idempotency_key, source=source)
    except (IdempotencyConflict, IdempotencyInFlight) as exc:
        return exc


def _lock_keys(client_id: int, keys: set[str]) -> set[str]:
    """Take every key's advisory lock (as message_create does, one statement for all); returns
    the keys another request holds. PostgreSQL only: on SQLite writers are serialised anyway."""
    if not keys or connection.vendor != "postgresql":
        return set()
    lock_ids = {key: idempotency_lock_id(client_id, key) for key in keys}
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT lock_id FROM unnest(%s::bigint[]) AS lock_id WHERE NOT pg_try_advisory_xact_lock(lock_id)",
            [sorted(set(lock_ids.values()))],
        )
        held = {row[0] for row in cursor.fetchall()}
    return {key for key, lock_id in lock_ids.items() if lock_id in held}


def _stored_for_keys(client: ApiClient, keys: set[str]) -> dict[str | None, Message]:
    if not keys:
        return {}
    return {
        message.idempotency_key: message for message in Message.objects.filter(client=client, idempotency_key__in=keys)
    }


def _message_row(client: ApiClient, fields: dict[str, Any], key: str | None, fingerprint: str) -> Message:
    """The row services._insert_message creates for a message without an ordering key."""
    now = timezone.now()  # each message its own, as one by one: acceptance times keep the batch's order
    message = _instance(
        Message,
        id=uuid.uuid4(),
        client_id=client.pk,
        ordering_key=None,
        sequence=None,
        ordering_mode="",
        **message_columns(fields=fields, key=key, fingerprint=fingerprint, now=now),
    )
    message.client = client  # cached, as create() would: reading it costs no query
    return message


def _instance(model: type[Model], **values: Any) -> Model:
    """model(**values), with the other fields' defaults, several times faster for a wide model:
    Django's positional path skips the per-field keyword handling (~50 µs a Message)."""
    return model(
        *[
            values[name] if name in values else default() if fresh else default
            for name, default, fresh in _defaults(model)
        ]
    )


@functools.cache
def _defaults(model: type[Model]) -> tuple[tuple[str, Any, bool], ...]:
    """Per concrete field, in the order Model(*args) takes them: its attname, its default and
    whether that is a callable giving a fresh value each time (uuid4, dict) or the value itself."""
    return tuple(
        (field.attname, field.default, True)
        if field.has_default() and callable(field.default)
        else (field.attname, field.get_default(), False)
        for field in model._meta.concrete_fields
    )


def _insert_rows(messages: list[Message], source: str) -> None:
    if not messages:
        return
    rows_insert(Message, messages)
    rows_insert(
        MessageEvent,
        [
            _instance(
                MessageEvent,
                message_id=message.id,
                created_at=message.created_at,
                source=source,
                from_state="",
                to_state=MessageState.ACCEPTED,
            )
            for message in messages
        ],
    )
