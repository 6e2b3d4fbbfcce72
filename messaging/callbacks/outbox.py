"""The outbox writer: the status callbacks an event of a message owes its client's endpoints, written
in the transaction of the event itself, so that a crash between the two cannot lose one.

Every reported event of a message (each applied transition, the initial `accepted`, each failed
send attempt) takes the message's next event number (Message.event_sequence); the writers of
those events bump the counter in a statement they make anyway (the transition's UPDATE, the
insert of new messages) or, for a failed attempt, with one atomic increment. Which endpoints get
a callback: the message's own endpoint if it named a callback_url (its events, else the
endpoint's), otherwise every enabled client-wide endpoint of its client whose events (empty: all)
include the event. A batch's callbacks cost one query for the endpoints and one COPY of the
rows; a client without endpoints costs nothing more (see callbacks_wanted). Delivery is kicked
once the transaction commits (messaging.callbacks.trigger).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connections, transaction
from django.db.models import BooleanField, Q
from django.db.models.expressions import RawSQL
from django.utils import timezone

from messaging.callbacks.signing import new_secret
from messaging.callbacks.trigger import callbacks_kick
from messaging.logging import scrubbed
from messaging.models import Callback, CallbackEndpoint, CallbackEvent, CallbackState, Message
from messaging.rows import rows_copy

# Events whose payload carries the message's last error ({"type", "code", "message"}).
ERROR_EVENTS = frozenset(
    {
        CallbackEvent.FAILED,
        CallbackEvent.UNDELIVERED,
        CallbackEvent.EXPIRED,
        CallbackEvent.DEAD_LETTERED,
        CallbackEvent.ATTEMPT_FAILED,
    }
)


@dataclass(frozen=True, slots=True)
class Occurrence:
    """One event of one message, with what the callbacks' payload says of the message."""

    message_id: uuid.UUID
    client_id: int
    endpoint_id: int | None  # Message.callback_endpoint_id: its own endpoint, or None for the client's
    events: list[str] | None  # Message.callback_events
    event: str
    sequence: int
    occurred_at: datetime
    state: str  # the message's state after the event
    previous_state: str | None  # for a state entered: the one it left (None: none, or not a state)
    channel: str
    priority: str
    category: str
    provider: str
    error: dict[str, str] | None = None
    attempt: dict[str, Any] | None = None

    def payload(self) -> dict[str, Any]:
        """The Standard Webhooks body: JSON values only (rows_insert sends it as it is)."""
        at = iso_utc(self.occurred_at)
        data: dict[str, Any] = {
            "message_id": str(self.message_id),
            "event": self.event,
            "sequence": self.sequence,
            "occurred_at": at,
            "state": self.state,
        }
        if self.event != CallbackEvent.ATTEMPT_FAILED:
            data["previous_state"] = self.previous_state
        data |= {
            "channel": self.channel,
            "priority": self.priority,
            "category": self.category,
            "provider": self.provider,
            "error": self.error,
        }
        if self.attempt is not None:
            data["attempt"] = self.attempt
        return {"type": f"message.{self.event}", "timestamp": at, "data": data}


def iso_utc(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def error_summary(error_type: str, code: str, message: str) -> dict[str, str] | None:
    """A payload's `error`: the provider's text scrubbed as in our logs (it may quote the recipient)."""
    if not (error_type or code or message):
        return None
    return {"type": error_type, "code": code, "message": scrubbed(message[:500])}


def callbacks_wanted() -> RawSQL:
    """Whether the client of a message row (a query on the message table itself, not aliased) has
    an enabled client-wide endpoint: asked in the statement that reads the messages anyway (an
    index probe a row), so a client without endpoints costs no query of its own, and an endpoint
    counts from its commit on (no cache to invalidate). Raw SQL: the ORM's subquery cost ~0.8 ms
    of CPU to compile, a third of a one-message transition."""
    return RawSQL(_WANTED_SQL, (), output_field=BooleanField())


_WANTED_SQL = (
    f"EXISTS (SELECT 1 FROM {CallbackEndpoint._meta.db_table} e "
    f"WHERE e.client_id = {Message._meta.db_table}.client_id AND e.enabled AND NOT e.per_message)"
)


@dataclass(frozen=True, slots=True)
class Routes:
    """Which endpoints may want the events of some messages: the clients' enabled client-wide
    endpoints, and the enabled endpoints messages named; with each one's events (empty: all)."""

    by_client: dict[int, list[tuple[int, list[str]]]]
    by_id: dict[int, list[str]]

    def __bool__(self) -> bool:
        return bool(self.by_id)


def callback_routes(*, client_ids: Iterable[int], endpoint_ids: Iterable[int], using: str = "default") -> Routes:
    """One query for the endpoints of these clients and these named endpoints (none without any)."""
    client_ids, endpoint_ids = sorted(set(client_ids)), sorted(set(endpoint_ids))
    by_client: dict[int, list[tuple[int, list[str]]]] = {}
    by_id: dict[int, list[str]] = {}
    if not client_ids and not endpoint_ids:
        return Routes(by_client, by_id)
    endpoints = (
        CallbackEndpoint.objects.using(using)
        .filter(Q(client_id__any=client_ids, per_message=False) | Q(pk__any=endpoint_ids), enabled=True)
        .values_list("pk", "client_id", "events", "per_message")
    )
    for pk, client_id, events, per_message in endpoints:
        by_id[pk] = events
        if not per_message:
            by_client.setdefault(client_id, []).append((pk, events))
    return Routes(by_client, by_id)


def callbacks_write(occurrences: Iterable[Occurrence], *, routes: Routes | None = None, using: str = "default") -> int:
    """Write the callbacks these events owe (inside the caller's transaction: the event's own) in
    two statements however many (one with `routes` found already), and kick delivery once it
    commits. Returns how many were written."""
    occurrences = list(occurrences)
    if not occurrences:
        return 0
    if routes is None:
        routes = callback_routes(
            client_ids=(o.client_id for o in occurrences if o.endpoint_id is None),
            endpoint_ids=(o.endpoint_id for o in occurrences if o.endpoint_id is not None),
            using=using,
        )
    by_client, by_id = routes.by_client, routes.by_id
    now = timezone.now()
    rows: list[tuple[Any, ...]] = []
    for occurrence in occurrences:
        if occurrence.endpoint_id is not None:
            events = by_id.get(occurrence.endpoint_id)
            targets = [] if events is None else [(occurrence.endpoint_id, occurrence.events or events)]
        else:
            targets = by_client.get(occurrence.client_id, [])
        payload = None
        for endpoint_id, events in targets:
            if events and occurrence.event not in events:
                continue
            payload = payload or occurrence.payload()
            rows.append(
                (
                    f"msg_{uuid.uuid4().hex}",
                    endpoint_id,
                    occurrence.message_id,
                    occurrence.event,
                    occurrence.sequence,
                    occurrence.occurred_at,
                    payload,
                    now,  # next_attempt_at: due at once
                    now,
                    *_NEW_CALLBACK.values(),
                )
            )
    if rows:
        rows_copy(Callback, _CALLBACK_COLUMNS, rows, using)
        _kick_on_commit(using)
    return len(rows)


# A new callback's other columns (no model instances: a row's values are built directly).
_NEW_CALLBACK: dict[str, Any] = {
    "state": CallbackState.PENDING,
    "attempts": 0,
    "attempt_log": [],
    "lease_expires_at": None,
    "delivered_at": None,
    "dead_lettered_at": None,
    "last_error": "",
    "retry_from": None,
}
_CALLBACK_COLUMNS = (
    *("webhook_id", "endpoint_id", "message_id", "event", "sequence", "occurred_at", "payload"),
    *("next_attempt_at", "created_at", *_NEW_CALLBACK),
)


def _kick_on_commit(using: str) -> None:
    """One kick per transaction, however many batches of callbacks it wrote. Robust: the rows are
    committed whatever the kick's fate, and the sweeper finds what it did not start."""
    connection = connections[using]
    if not any(func is callbacks_kick for _, func, _ in connection.run_on_commit):
        transaction.on_commit(callbacks_kick, using=using, robust=True)


def callbacks_attempt_failed(
    *, message_id: Any, number: int, provider: str, outcome: str, error: dict[str, str], at: datetime
) -> int:
    """A send attempt ended in an error: the message's next event number and its callbacks.

    The message row is not locked by the dispatch path: the number is taken by one atomic
    increment (it waits for a transition holding the row and reads the number it left), so it
    cannot collide with one. The caller holds a transaction for the callbacks to share.
    """
    meta = Message._meta
    columns = ", ".join(meta.get_field(name).column for name in _ATTEMPT_COLUMNS)
    sql = (
        f"UPDATE {meta.db_table} SET event_sequence = event_sequence + 1 WHERE {meta.pk.column} = %s "
        f"RETURNING {columns}, {_WANTED_SQL}"
    )
    with connections["default"].cursor() as cursor:
        cursor.execute(sql, [message_id])
        row = cursor.fetchone()
    if row is None:
        return 0
    values = dict(zip(_ATTEMPT_COLUMNS, row[:-1], strict=True))
    if values["callback_endpoint"] is None and not row[-1]:
        return 0
    events = values["callback_events"]
    occurrence = Occurrence(
        message_id=message_id,
        client_id=values["client"],
        endpoint_id=values["callback_endpoint"],
        events=json.loads(events) if isinstance(events, str) else events,
        event=CallbackEvent.ATTEMPT_FAILED,
        sequence=values["event_sequence"],
        occurred_at=at,
        state=values["state"],
        previous_state=None,
        channel=values["channel"],
        priority=values["priority"],
        category=values["category"],
        provider=provider,
        error=error_summary(error.get("error_type", ""), error.get("error_code", ""), error.get("error_message", "")),
        attempt={"number": number, "provider": provider, "outcome": outcome},
    )
    return callbacks_write([occurrence])


_ATTEMPT_COLUMNS = (
    "event_sequence",
    "client",
    "callback_endpoint",
    "callback_events",
    "state",
    "channel",
    "priority",
    "category",
)


# --- a message's own callback_url ----------------------------------------------------------------
def secret_new(now: datetime) -> dict[str, Any]:
    """A fresh Standard Webhooks signing secret, as CallbackEndpoint.secrets holds it."""
    return {"secret": new_secret(), "created_at": iso_utc(now), "expires_at": None}


def callback_endpoints_for_urls(*, client_id: int, urls: Iterable[str]) -> dict[str, int]:
    """The client's endpoint id for each URL messages named as their callback_url, registering the
    ones it does not have yet (per_message, enabled, a fresh secret). An endpoint the client
    already has with that URL is used as it is, disabled or not (a disabled one gets nothing).
    Inside the caller's transaction: rolled back with the messages that named them."""
    urls = set(urls)
    if not urls:
        return {}
    found = dict(
        CallbackEndpoint.objects.filter(client_id=client_id, url__in=urls).values_list("url", "pk")  # few URLs
    )
    missing = urls - set(found)
    if missing:
        now = timezone.now()
        # A concurrent request registering the same URL wins; its row is read below.
        CallbackEndpoint.objects.bulk_create(
            [
                CallbackEndpoint(
                    client_id=client_id, url=url, per_message=True, enabled=True, secrets=[secret_new(now)]
                )
                for url in sorted(missing)
            ],
            ignore_conflicts=True,
        )
        found |= dict(CallbackEndpoint.objects.filter(client_id=client_id, url__in=missing).values_list("url", "pk"))
    return found
