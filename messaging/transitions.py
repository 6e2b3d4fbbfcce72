"""The one writer of a message's state: the TRANSITIONS table applied with a conditional UPDATE,
its event, callbacks and dead letter (messaging.services re-exports it; messaging.ingest fails a
suppressed message through it, which services, importing ingest, could not offer)."""

from __future__ import annotations

import functools
import json
import logging
import uuid
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import BooleanField, ExpressionWrapper, Q
from django.utils import timezone

from messaging.callbacks.outbox import ERROR_EVENTS, Occurrence, callbacks_wanted, callbacks_write, error_summary
from messaging.dead_letters import dead_letter_park
from messaging.logging import scrubbed
from messaging.metrics import latency_observe
from messaging.models import Message, MessageEvent
from messaging.ordering import ordering_release
from messaging.rows import rows_insert, rows_update
from messaging.states import ALLOWED_SOURCES, DEAD_LETTER_STATES, TIMESTAMP_FIELD, transition_allowed

logger = logging.getLogger(__name__)


def message_transition(
    *,
    message_id: Any,
    to_state: str,
    source: str,
    detail: str = "",
    fields: dict[str, Any] | None = None,
    extra_filter: Q | None = None,
) -> bool:
    """Move a message to `to_state` if the TRANSITIONS table allows it from its current state
    (and `extra_filter` holds): messages_transition for one message. Returns whether it was applied."""
    found, applied = _transition(
        to_state=to_state, source=source, changes={message_id: (detail, fields or {})}, extra_filter=extra_filter
    )
    if not found:
        raise Message.DoesNotExist(f"message {message_id} does not exist")
    return bool(applied)


def _log_transition(
    *,
    message_id: Any,
    channel: str,
    priority: str,
    provider: str,
    from_state: str,
    to_state: str,
    applied: bool,
    source: str,
    detail: str,
) -> None:
    # A provider's error text may quote the recipient: masked here (kept whole in the event row).
    detail = scrubbed(detail[:500])
    logger.info(
        "message %s %s%s -> %s (%s) %s",
        message_id,
        "" if applied else "refused ",
        from_state,
        to_state,
        source,
        detail,
        extra={
            "event": "transition",
            "message_id": str(message_id),
            "channel": channel,
            "priority": priority,
            "provider": provider,
            "from_state": from_state,
            "to_state": to_state,
            "applied": applied,
            "source": source,
            "detail": detail,
        },
    )


def messages_transition(
    *,
    to_state: str,
    source: str,
    changes: dict[Any, tuple[str, dict[str, Any]]],
    extra_filter: Q | None = None,
) -> set[Any]:
    """Move many messages to `to_state`: {id: (detail, fields)}, the same fields for each.

    The only writer of the state column: the rows are locked (in one order for every writer),
    the transition applied with one UPDATE to those in a source state the TRANSITIONS table
    allows (and matching `extra_filter`), one event per message either way, and the status
    callbacks the applied ones owe (messaging.callbacks.outbox), a few statements in all however
    many messages. Entering failed, expired or dead_lettered parks a dead letter in
    the same transaction. Returns the ids it was applied to.
    """
    found, applied = _transition(to_state=to_state, source=source, changes=changes, extra_filter=extra_filter)
    if len(found) < len(changes):
        logger.warning("transition to %s: %d message(s) no longer exist", to_state, len(changes) - len(found))
    return applied


def _transition(
    *, to_state: str, source: str, changes: dict[Any, tuple[str, dict[str, Any]]], extra_filter: Q | None
) -> tuple[set[Any], set[Any]]:
    """messages_transition's work; returns the ids found and the ids it was applied to."""
    if not changes:
        return set(), set()
    to_key = Message._meta.pk.to_python
    changes = {to_key(pk): change for pk, change in changes.items()}
    sources = ALLOWED_SOURCES[to_state]
    now = timezone.now()
    stamp = {"state": to_state, TIMESTAMP_FIELD[to_state]: now, "updated_at": now}
    # The callbacks' columns too (messaging.callbacks.outbox): the event number, whose endpoints,
    # what the payload says.
    columns = LOCKED_COLUMNS + (ERROR_COLUMNS if to_state in ERROR_EVENTS else ())
    # No savepoint inside a caller's transaction (dispatch records the attempt with it, receipts
    # apply a batch): two round trips less, and a failure here fails the caller's transaction anyway.
    with transaction.atomic(savepoint=False):
        rows = _locked_rows(list(changes), columns, extra_filter)
        applicable = {
            row["pk"]: row
            for row in rows
            if row["state"] in sources
            and row.get("extra_ok", True)
            and transition_allowed(from_state=row["state"], to_state=to_state, source=source)
        }
        # The rows are locked and their states checked: the write names only keys. A state
        # predicate would let PostgreSQL pick the state index, slow while its statistics lag a
        # campaign just accepted (messaging.dispatch._claim).
        updated = rows_update(
            Message.objects.all(),
            {
                pk: {**stamp, **changes[pk][1], "event_sequence": row["event_sequence"] + 1}
                for pk, row in applicable.items()
            },
        )
        if updated != len(applicable):  # cannot happen under the row locks: refuse to guess
            raise RuntimeError(f"transition matched {updated} of {len(applicable)} locked rows")
        rows_insert(
            MessageEvent,
            [
                MessageEvent(
                    message_id=row["pk"],
                    created_at=now,
                    source=source,
                    from_state=row["state"],
                    to_state=to_state,
                    applied=row["pk"] in applicable,
                    detail=changes[row["pk"]][0][:2000],
                )
                for row in rows
            ],
        )
        callbacks_write(
            _occurrence(row, to_state=to_state, fields=changes[pk][1], at=now)
            for pk, row in applicable.items()
            if row["callbacks_wanted"] or row["callback_endpoint_id"] is not None
        )
        for pk, row in applicable.items():
            if to_state in DEAD_LETTER_STATES:
                dead_letter_park(message_id=pk, reason=changes[pk][0], parked_at=now)
            if row["sequence"] is not None:
                # Later messages with the same ordering key may be waiting for this one to move.
                transaction.on_commit(lambda pk=pk: ordering_release(message_id=pk))
        if applicable:
            # Counted once committed: a rolled-back transition never happened.
            transaction.on_commit(
                lambda: [
                    latency_observe(
                        to_state=to_state,
                        from_state=row["state"],
                        channel=row["channel"],
                        priority=row["priority"],
                        accepted_at=row["accepted_at"] or row["created_at"],
                        at=now,
                    )
                    for row in applicable.values()
                ]
            )
    for row in rows:
        _log_transition(
            message_id=row["pk"],
            channel=row["channel"],
            priority=row["priority"],
            provider=changes[row["pk"]][1].get("provider", row["provider"]),
            from_state=row["state"],
            to_state=to_state,
            applied=row["pk"] in applicable,
            source=source,
            detail=changes[row["pk"]][0],
        )
    return {row["pk"] for row in rows}, set(applicable)


LOCKED_COLUMNS = (
    *("pk", "state", "channel", "priority", "provider", "accepted_at", "created_at", "sequence"),
    *("client_id", "category", "event_sequence", "callback_endpoint_id", "callback_events"),
)
ERROR_COLUMNS = ("last_error_type", "last_error_code", "last_error_message")


def _locked_rows(ids: list[Any], columns: tuple[str, ...], extra_filter: Q | None) -> list[dict[str, Any]]:
    """The messages' `columns`, their rows locked in key order (one lock order for every writer of
    a batch: no deadlock between two), with `callbacks_wanted` (outbox.callbacks_wanted) and, with
    `extra_filter`, whether it holds (`extra_ok`: asked of the locked rows in the same statement,
    so it costs no round trip of its own)."""
    if extra_filter is not None:
        locked = Message.objects.select_for_update().filter(pk__any=ids)
        locked = locked.annotate(
            extra_ok=ExpressionWrapper(extra_filter, output_field=BooleanField()), callbacks_wanted=callbacks_wanted()
        )
        return list(locked.order_by("pk").values(*columns, "callbacks_wanted", "extra_ok"))
    names = (*columns, "callbacks_wanted")
    with connection.cursor() as cursor:
        cursor.execute(_locked_sql(columns), [_keys_literal(ids)])
        rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    for row in rows:
        if isinstance(row["callback_events"], str):  # jsonb comes as text, as the ORM reads it
            row["callback_events"] = json.loads(row["callback_events"])
    return rows


_ANY_KEY = uuid.UUID(int=0)


@functools.cache
def _locked_sql(columns: tuple[str, ...]) -> str:
    """_locked_rows' statement, compiled by the ORM once per column set: building it costs ~1 ms of
    CPU, a third of a one-message transition. Its one parameter is the keys' array literal (the
    `any` lookup, messaging.rows.AnyOf). Called inside a transaction (select_for_update insists)."""
    locked = Message.objects.select_for_update().filter(pk__any=[_ANY_KEY])
    locked = locked.annotate(callbacks_wanted=callbacks_wanted())
    sql, params = locked.order_by("pk").values(*columns, "callbacks_wanted").query.sql_with_params()
    if params != (_keys_literal([_ANY_KEY]),):
        raise RuntimeError(f"the locked read's parameters are not the keys alone: {params}")
    return sql


def _keys_literal(ids: list[Any]) -> str:
    return "{" + ",".join(map(str, ids)) + "}"


def _occurrence(row: dict[str, Any], *, to_state: str, fields: dict[str, Any], at: datetime) -> Occurrence:
    """The event of a transition applied to a locked row (read before the write), for its callbacks."""
    error = None
    if to_state in ERROR_EVENTS:
        last = {name: fields.get(name, row[name]) for name in ERROR_COLUMNS}
        error = error_summary(last["last_error_type"], last["last_error_code"], last["last_error_message"])
    return Occurrence(
        message_id=row["pk"],
        client_id=row["client_id"],
        endpoint_id=row["callback_endpoint_id"],
        events=row["callback_events"],
        event=to_state,
        sequence=row["event_sequence"] + 1,
        occurred_at=at,
        state=to_state,
        previous_state=row["state"],
        channel=row["channel"],
        priority=row["priority"],
        category=row["category"],
        provider=fields.get("provider", row["provider"]),
        error=error,
    )
