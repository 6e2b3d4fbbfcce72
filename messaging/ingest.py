"""Accepting messages: a request's messages (a batch, or one: a batch of one) stored in a few statements,
not a few per message, idempotently."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.db.models import Model
from django.utils import timezone

from messaging.callbacks.outbox import Occurrence, callback_endpoints_for_urls, callback_routes, callbacks_write
from messaging.limits import (
    PriorityNotAllowed,
    QuotaExceeded,
    QuotaGrant,
    client_allowed_priorities,
    client_daily_quota,
    quota_give_back,
    quota_retry_after,
    quota_take,
)
from messaging.logging import masked
from messaging.metrics import messages_suppressed_count
from messaging.models import ApiClient, CallbackEvent, ErrorType, EventSource, Message, MessageEvent
from messaging.ordering import ordering_hold, ordering_mode_for, sequence_next
from messaging.publish import message_publish, messages_publish
from messaging.quiet_hours import deadline_note, quiet_hours_policy
from messaging.routing import retry_policy_for
from messaging.rows import rows_insert
from messaging.states import MessageState
from messaging.suppressions.selectors import Blocker, SuppressionIndex
from messaging.transitions import messages_transition

logger = logging.getLogger(__name__)

# How a message refused for a suppressed address starts its failure detail (and so its dead
# letter's reason): what tells acceptance's refusals from dispatch's (reconciliation.dashboard).
REFUSED_AT_ACCEPTANCE = "refused at acceptance"


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different payload (HTTP 422)."""

    def __init__(self, message: Message):
        super().__init__("idempotency key already used with a different payload")
        self.message = message


class IdempotencyInFlight(Exception):
    """Another request with this idempotency key is still being processed (HTTP 409)."""


@dataclass(frozen=True)
class CreateOutcome:
    message: Message
    created: bool


def request_fingerprint(fields: dict[str, Any]) -> str:
    """A stable hash of the request as the client sent it (minus the key), for replay checks."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def idempotency_lock_id(client_id: int, key: str) -> int:
    """The PostgreSQL advisory lock id of (client, key): one per key, for single and batch requests."""
    digest = hashlib.sha256(f"idem:{client_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _lock_idempotency_key(client_id: int, key: str) -> None:
    """Hold a transaction-scoped lock on (client, key), or raise IdempotencyInFlight.

    PostgreSQL only; on SQLite writers are serialised anyway and the unique constraint decides.
    """
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [idempotency_lock_id(client_id, key)])
        if not cursor.fetchone()[0]:
            raise IdempotencyInFlight()


def _existing_for_key(client: ApiClient, key: str, fingerprint: str) -> CreateOutcome | None:
    existing = Message.objects.filter(client=client, idempotency_key=key).first()
    if existing is None:
        return None
    if existing.request_fingerprint != fingerprint:
        raise IdempotencyConflict(existing)
    return CreateOutcome(existing, created=False)


def message_deadline(fields: dict[str, Any], now: datetime) -> datetime:
    """The expires_at of a message accepted at `now`: the sender's, else its policy's TTL,
    counted from its send_at when it is scheduled later (a TTL is how long the message is worth
    sending once it is meant to go, docs/scheduling.md)."""
    if fields.get("expires_at"):
        return fields["expires_at"]
    start = max(now, fields["send_at"]) if fields.get("send_at") else now
    if fields.get("ttl_seconds"):
        return start + timedelta(seconds=fields["ttl_seconds"])
    policy = retry_policy_for(fields.get("priority", "transactional"), fields.get("category", ""))
    return start + timedelta(seconds=policy.ttl_seconds)


def first_attempt_at(fields: dict[str, Any], now: datetime) -> datetime | None:
    """When a new message may first be sent: its send_at when that is still to come, else None (at once)."""
    send_at = fields.get("send_at")
    return send_at if send_at is not None and send_at > now else None


def waits_at_acceptance(next_attempt_at: datetime | None, now: datetime) -> bool:
    """Whether a new message is stored without being published: its first attempt is later
    (a scheduled send, or anything else that set next_attempt_at ahead at acceptance). The
    release job publishes it when due (messaging.sweeper.messages_release_due), the sweeper if
    that publish is lost."""
    return next_attempt_at is not None and next_attempt_at > now


def message_columns(
    *, fields: dict[str, Any], key: str | None, fingerprint: str, now: datetime, client: ApiClient | None = None
) -> dict[str, Any]:
    """A newly accepted message's columns but its client and ordering (the same row one by one
    and together). One due later (a send_at, quiet hours) has next_attempt_at and no enqueued_at:
    it is not published now; the release job publishes it when due."""
    expires_at = message_deadline(fields, now)
    due = _due_at(fields=fields, client=client, now=now, expires_at=expires_at)
    return {
        "channel": fields["channel"],
        "to": fields["to"],
        "body": fields.get("body", ""),  # a template message may have none (docs/whatsapp.md)
        "template": fields.get("template", ""),
        "template_variables": fields.get("variables", {}),
        "subject": fields.get("subject", ""),
        "priority": fields.get("priority", "transactional"),
        "category": fields.get("category", ""),
        "idempotency_key": key,
        "request_fingerprint": fingerprint,
        "expires_at": expires_at,
        "send_at": fields.get("send_at"),
        "recipient_timezone": fields.get("timezone", ""),
        "deadline_from_sender": bool(fields.get("expires_at") or fields.get("ttl_seconds")),
        "fallback_channels": fields.get("fallback_channels", []),
        "fallback_to": fields.get("fallback_to", {}),
        "metadata": fields.get("metadata", {}),
        "callback_events": fields.get("callback_events"),
        "event_sequence": 1,  # its first event, `accepted`
        "state": MessageState.ACCEPTED,
        "created_at": now,
        "accepted_at": now,
        "next_attempt_at": due.next_attempt_at,
        # No task for a message that waits: the release job publishes it when due, and marks it then.
        "enqueued_at": None if waits_at_acceptance(due.next_attempt_at, now) else now,
        "last_error_message": due.note,
    }


@dataclass(frozen=True)
class _Due:
    next_attempt_at: datetime | None = None  # None: at once
    note: str = ""  # why it will expire waiting (its deadline falls inside quiet hours)


_AT_ONCE = _Due()


def _due_at(*, fields: dict[str, Any], client: ApiClient | None, now: datetime, expires_at: datetime) -> _Due:
    """When a new message may first be sent: its send_at (scheduled sends) or now, moved to the end
    of the recipient's quiet hours if it falls inside them (messaging.quiet_hours). A message whose
    deadline comes first still waits: the sweeper expires it, it does not wake anyone."""
    start = first_attempt_at(fields, now)
    policy = quiet_hours_policy(client.quiet_hours if client is not None else None)
    if not policy.config:
        return _Due(start) if start else _AT_ONCE
    release = policy.release(
        priority=fields.get("priority", "transactional"),
        category=fields.get("category", ""),
        channel=fields["channel"],
        to=fields["to"],
        timezone_name=fields.get("timezone", ""),
        at=start or now,
    )
    if release is None:
        return _Due(start) if start else _AT_ONCE
    note = deadline_note(release=release, expires_at=expires_at) if release > expires_at else ""
    return _Due(release, note)


def _insert_message(
    client: ApiClient,
    fields: dict[str, Any],
    key: str | None,
    fingerprint: str,
    source: str,
    suppressions: SuppressionIndex,
) -> Message:
    ordering_key = fields.get("ordering_key") or None
    # The number first (it waits for a concurrent request with the same key), then the clock, so
    # the acceptance times of one key's messages run in sequence order too.
    sequence = sequence_next(client_id=client.pk, key=ordering_key) if ordering_key else None
    callback_url = fields.get("callback_url")
    endpoints = callback_endpoints_for_urls(client_id=client.pk, urls=[callback_url] if callback_url else [])
    now = timezone.now()
    message = Message.objects.create(
        client=client,
        **message_columns(fields=fields, key=key, fingerprint=fingerprint, now=now, client=client),
        callback_endpoint_id=endpoints.get(callback_url),
        ordering_key=ordering_key,
        sequence=sequence,
        ordering_mode=ordering_mode_for(requested=fields.get("ordering_mode"), category=fields.get("category", ""))
        if ordering_key
        else "",
    )
    MessageEvent.objects.create(
        message=message, created_at=now, source=source, from_state="", to_state=MessageState.ACCEPTED
    )
    callbacks_accepted([message])
    message_accepted_log(message=message, source=source)
    if _blocker(suppressions, message) is not None:
        return message  # failed by messages_create_many before commit: never published, never waits
    if message.sequence is not None and ordering_hold(message, now=now):
        return message  # published by its predecessor's next move, not now: no task spent on waiting
    if waits_at_acceptance(message.next_attempt_at, now):
        return message  # published by the release job when due (a scheduled send, quiet hours)
    # Its own task, whatever its priority: it waits for its key's turn, which batching cannot hurry.
    transaction.on_commit(
        lambda: message_publish(message_id=message.id, channel=message.channel, priority=message.priority)
    )
    return message


def message_accepted_log(*, message: Message, source: str) -> None:
    """The one log line of an acceptance (recipient masked), for single and batch requests alike."""
    to = masked(message.to)
    logger.info(
        "message %s accepted: %s to %s",
        message.id,
        message.channel,
        to,
        extra={
            "event": "transition",
            "message_id": str(message.id),
            "channel": message.channel,
            "priority": message.priority,
            "from_state": "",
            "to_state": MessageState.ACCEPTED,
            "applied": True,
            "source": source,
            "to": to,
        },
    )


@dataclass(frozen=True)
class BatchItem:
    """One validated item: the serializer's fields without the key, and the idempotency key."""

    fields: dict[str, Any]
    idempotency_key: str | None = None


# Per item: the stored (or replayed) message, or why it was refused.
ItemResult = CreateOutcome | IdempotencyConflict | IdempotencyInFlight | PriorityNotAllowed | QuotaExceeded


def messages_create_many(
    *, client: ApiClient, items: Sequence[BatchItem], source: str = EventSource.API
) -> list[ItemResult]:
    """Accept validated messages in one transaction; results in the items' order.

    The same rows, event, log line and idempotency answers as one request per item, in a
    few statements: the keys' locks in one, the stored keys in one, one INSERT of the messages and
    one of their events, and one publish on commit. A key repeated in the batch behaves as a
    repeated request: the later item replays the first (or conflicts with it). A database error
    is raised and nothing is stored.
    """
    if not items:
        return []
    results: list[ItemResult | None] = [None] * len(items)
    admitted = _within_limits(client, items, results)
    grants = _quota_take(client, items, admitted, results)
    admitted = [index for index in admitted if results[index] is None]
    # Ordering-key items are accepted one by one (_accept_alone): a sequence number comes from the key's
    # counter row and the message may wait for its predecessor. They are rare in bulk traffic.
    # Items sharing an idempotency key with one of them go the same way, to keep the key in order.
    ordered_keys = {items[index].idempotency_key for index in admitted if items[index].fields.get("ordering_key")}
    ordered_keys -= {None}
    alone = [
        index
        for index in admitted
        if items[index].fields.get("ordering_key") or items[index].idempotency_key in ordered_keys
    ]
    together = sorted(set(admitted) - set(alone))
    # Only the primary (channel, to) is looked up here, in one query for the whole batch (_blocker:
    # a message with fallback channels is left to dispatch, which checks every hop).
    suppressions = SuppressionIndex.load(
        (client.pk, items[index].fields["channel"], items[index].fields["to"]) for index in admitted
    )
    try:
        with transaction.atomic():
            stored = _accept_together(client, items, together, results, source, suppressions)
            for index in alone:
                results[index] = _accept_alone(client, items[index], source, suppressions)
            failed = _fail_suppressed(results, admitted, suppressions, source) if suppressions else set()
            # A message that waits (a scheduled send, quiet hours) is published by the release job when due.
            stored = [
                message
                for message in stored
                if message.id not in failed and not waits_at_acceptance(message.next_attempt_at, message.created_at)
            ]
            if stored:
                transaction.on_commit(
                    lambda: messages_publish(messages=[(m.id, m.channel, m.priority) for m in stored])
                )
    except BaseException:
        for grant in grants.values():
            quota_give_back(grant=grant, count=grant.granted)  # nothing was stored
        raise
    created: dict[str, int] = {}
    for index in admitted:
        result = results[index]
        if isinstance(result, CreateOutcome) and result.created and result.message.id not in failed:
            created[result.message.channel] = created.get(result.message.channel, 0) + 1
    for channel, grant in grants.items():
        # Replays, conflicts, and suppressed messages (never sent: they spend no quota).
        quota_give_back(grant=grant, count=grant.granted - created.get(channel, 0))
    return results


def _blocker(suppressions: SuppressionIndex, message: Message) -> Blocker | None:
    """What keeps a new message from being sent at all, or None. A message with fallback channels
    is accepted even if its own address is suppressed: dispatch checks every hop and sends the
    first one not suppressed (or fails the message `suppressed` when none is left)."""
    if message.fallback_channels:
        return None
    return suppressions.blocking(
        client_id=message.client_id, channel=message.channel, address=message.to, category=message.category
    )


def _fail_suppressed(
    results: list[ItemResult | None], admitted: list[int], suppressions: SuppressionIndex, source: str
) -> set[uuid.UUID]:
    """Move the new messages whose address is suppressed from accepted to failed (error type
    `suppressed`) through the transition service, in the batch's transaction: their events, dead
    letters and callbacks (accepted, failed) as for any failed message. Their results are re-read
    (one query) so the answer shows them failed. Returns their ids."""
    changes: dict[uuid.UUID, tuple[str, dict[str, Any]]] = {}
    channels: dict[str, int] = {}
    for index in admitted:
        result = results[index]
        if not isinstance(result, CreateOutcome) or not result.created:
            continue  # a replay answers what was stored then
        blocker = _blocker(suppressions, result.message)
        if blocker is None:
            continue
        text = blocker.describe(result.message.channel)
        changes[result.message.id] = (
            f"{REFUSED_AT_ACCEPTANCE}: {text}",
            {"last_error_type": ErrorType.SUPPRESSED, "last_error_code": blocker.reason, "last_error_message": text},
        )
        channels[result.message.channel] = channels.get(result.message.channel, 0) + 1
    if not changes:
        return set()
    messages_transition(to_state=MessageState.FAILED, source=source, changes=changes)
    fresh = Message.objects.in_bulk(list(changes))
    for index in admitted:
        result = results[index]
        # A later item with the same key replays it: that answer shows it failed too.
        if isinstance(result, CreateOutcome) and result.message.id in fresh:
            fresh[result.message.id].client = result.message.client
            results[index] = CreateOutcome(fresh[result.message.id], created=result.created)
    transaction.on_commit(
        lambda: [
            messages_suppressed_count(channel=channel, stage="acceptance", count=count)
            for channel, count in channels.items()
        ]
    )
    return set(changes)


def _within_limits(client: ApiClient, items: Sequence[BatchItem], results: list[ItemResult | None]) -> list[int]:
    """The indexes of the items whose priority the client may send; the others refused."""
    allowed = client_allowed_priorities(client=client)
    admitted = []
    for index, item in enumerate(items):
        priority = item.fields.get("priority", "transactional")
        if priority in allowed:
            admitted.append(index)
        else:
            results[index] = PriorityNotAllowed(priority, allowed)
    return admitted


def _quota_take(
    client: ApiClient, items: Sequence[BatchItem], admitted: list[int], results: list[ItemResult | None]
) -> dict[str, QuotaGrant]:
    """Take the daily quota of the admitted items, one counter increment per channel; the items
    past what fits (in request order) are refused, unless their idempotency key names a stored
    message (a retried request replays what it stored, whatever the quota says now)."""
    by_channel: dict[str, list[int]] = {}
    for index in admitted:
        by_channel.setdefault(items[index].fields["channel"], []).append(index)
    now = timezone.now()
    grants = {}
    for channel, indexes in by_channel.items():
        grant = quota_take(client=client, channel=channel, count=len(indexes), now=now)
        grants[channel] = grant
        over = indexes[grant.granted :]
        if not over:
            continue
        keys = {items[index].idempotency_key for index in over} - {None}
        stored = (
            set(
                Message.objects.filter(client=client, idempotency_key__in=keys).values_list(
                    "idempotency_key", flat=True
                )
            )
            if keys
            else set()
        )
        quota = client_daily_quota(client=client, channel=channel) or 0
        for index in over:
            if items[index].idempotency_key not in stored:
                results[index] = QuotaExceeded(channel, quota, quota_retry_after(now))
    return grants


def _accept_together(
    client: ApiClient,
    items: Sequence[BatchItem],
    indexes: list[int],
    results: list[ItemResult | None],
    source: str,
    suppressions: SuppressionIndex,
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
    _resolve_callback_urls(client, [(message, items[index].fields) for index, message in new])
    try:
        # A savepoint only when a key can collide: without keys no constraint can fail on a new row.
        with transaction.atomic(savepoint=bool(keys)):
            _insert_rows([message for _, message in new], source)
    except IntegrityError:
        if not keys:
            raise
        # Only the idempotency constraint can collide: another request stored one of the keys
        # without our lock (SQLite has none). Each keyed item is settled on its own.
        new = [(index, message) for index, message in new if message.idempotency_key is None]
        _insert_rows([message for _, message in new], source)
        for index in indexes:
            if items[index].idempotency_key:
                results[index] = _accept_alone(client, items[index], source, suppressions)
    for index, message in new:
        results[index] = CreateOutcome(message, created=True)
        message_accepted_log(message=message, source=source)
    return [message for _, message in new]


def _accept_alone(client: ApiClient, item: BatchItem, source: str, suppressions: SuppressionIndex) -> ItemResult:
    """One item in a transaction (a savepoint) of its own: an item with an ordering key (its
    sequence number comes from the key's counter row and it may wait for its predecessor), or a
    keyed item whose key a writer without our lock stored meanwhile."""
    try:
        return _accept_one(client, item.fields, item.idempotency_key, source, suppressions)
    except (IdempotencyConflict, IdempotencyInFlight) as exc:
        return exc


def _accept_one(
    client: ApiClient, fields: dict[str, Any], idempotency_key: str | None, source: str, suppressions: SuppressionIndex
) -> CreateOutcome:
    fingerprint = request_fingerprint(fields)
    try:
        with transaction.atomic():
            if idempotency_key:
                _lock_idempotency_key(client.pk, idempotency_key)
                outcome = _existing_for_key(client, idempotency_key, fingerprint)
                if outcome is not None:
                    return outcome
            message = _insert_message(client, fields, idempotency_key, fingerprint, source, suppressions)
    except IntegrityError:
        # Only the (client, idempotency_key) constraint can collide here: a concurrent twin won.
        if not idempotency_key:
            raise
        outcome = _existing_for_key(client, idempotency_key, fingerprint)
        if outcome is None:
            raise IdempotencyInFlight() from None
        return outcome
    return CreateOutcome(message, created=True)


def _lock_keys(client_id: int, keys: set[str]) -> set[str]:
    """Take every key's advisory lock (as _accept_one does, one statement for all); returns
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
    """The row _insert_message creates, for a message without an ordering key."""
    now = timezone.now()  # each message its own, as one by one: acceptance times keep the batch's order
    message = _instance(
        Message,
        id=uuid.uuid4(),
        client_id=client.pk,
        ordering_key=None,
        sequence=None,
        ordering_mode="",
        **message_columns(fields=fields, key=key, fingerprint=fingerprint, now=now, client=client),
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


def _resolve_callback_urls(client: ApiClient, new: list[tuple[Message, dict[str, Any]]]) -> None:
    """Point each new message naming a callback_url at the client's endpoint for it (registered
    on first use): one query for the batch's URLs, another when some are new."""
    urls = {fields["callback_url"] for _, fields in new if fields.get("callback_url")}
    if not urls:
        return
    endpoints = callback_endpoints_for_urls(client_id=client.pk, urls=urls)
    for message, fields in new:
        if fields.get("callback_url"):
            message.callback_endpoint_id = endpoints[fields["callback_url"]]


def callbacks_accepted(messages: list[Message]) -> None:
    """The callbacks of new messages' first event, `accepted` (numbered 1 by message_columns): one
    query for their client's endpoints and any they named, and nothing more if there are none."""
    routes = callback_routes(
        client_ids={message.client_id for message in messages},
        endpoint_ids={message.callback_endpoint_id for message in messages} - {None},
    )
    if routes:
        callbacks_write((_accepted_occurrence(message) for message in messages), routes=routes)


def _accepted_occurrence(message: Message) -> Occurrence:
    return Occurrence(
        message_id=message.id,
        client_id=message.client_id,
        endpoint_id=message.callback_endpoint_id,
        events=message.callback_events,
        event=CallbackEvent.ACCEPTED,
        sequence=message.event_sequence,
        occurred_at=message.created_at,
        state=MessageState.ACCEPTED,
        previous_state=None,
        channel=message.channel,
        priority=message.priority,
        category=message.category,
        provider=message.provider,
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
    callbacks_accepted(messages)
