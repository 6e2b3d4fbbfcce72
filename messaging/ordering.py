"""Per-key ordering: "Your order is confirmed" never arrives after "Your order has shipped".

A message with an ordering_key gets a gap-free sequence number per client and key when it is
accepted. At acceptance a message whose predecessor is still ahead is stored waiting and not published
(`ordering_hold`). The send path asks `ordering_wait` before calling a provider: while an earlier message
with the same key has not been dispatched (or, in the stricter mode, delivered), this one steps
aside: it records what it waits for, gives back its lease and holds no worker. The transition
service releases the waiters of a message that moved (`ordering_release`, on commit); the sweeper
re-publishes any waiter whose blocker moved without releasing it (a crash in between).

Messages without an ordering key never get here: one `if` on the send path.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.models import Message, OrderingKey, OrderingMode
from messaging.publish import message_publish
from messaging.rows import rows_update_in_key_order
from messaging.states import DEAD_LETTER_STATES, MessageState

logger = logging.getLogger(__name__)


def sequence_next(*, client_id: int, key: str) -> int:
    """The next sequence number for (client, key). Call inside the transaction storing the message:
    the counter row stays locked until it commits, so concurrent requests for one key take turns
    and a rolled-back request gives its number back (no gaps)."""
    table = connection.ops.quote_name(OrderingKey._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (client_id, key, last_sequence) VALUES (%s, %s, 1) "
            f"ON CONFLICT (client_id, key) DO UPDATE SET last_sequence = {table}.last_sequence + 1 "
            "RETURNING last_sequence",
            [client_id, key],
        )
        return int(cursor.fetchone()[0])


def ordering_mode_for(*, requested: str | None, category: str) -> str:
    """The message's own mode, else its category's (CATEGORY_ORDERING), else dispatched."""
    return requested or messaging_setting("CATEGORY_ORDERING").get(category) or OrderingMode.DISPATCHED


def blocking(message: Message, now: datetime) -> Q:
    """What an earlier message's state must be to hold this one back."""
    holds = Q(state=MessageState.ACCEPTED)
    if messaging_setting("ORDERING_DEAD_PREDECESSOR") == "hold":
        holds |= Q(state__in=DEAD_LETTER_STATES)
    if message.ordering_mode == OrderingMode.DELIVERED:
        timeout = timedelta(seconds=messaging_setting("ORDERING_RECEIPT_TIMEOUT_SECONDS"))
        holds |= Q(state=MessageState.DISPATCHED, dispatched_at__gt=now - timeout)
    return holds


def ordering_blocker(message: Message, now: datetime | None = None) -> Message | None:
    """The closest earlier message with the same key that holds this one back, or None."""
    now = now or timezone.now()
    return (
        Message.objects.filter(
            client_id=message.client_id, ordering_key=message.ordering_key, sequence__lt=message.sequence
        )
        .filter(blocking(message, now))
        .order_by("-sequence")
        .only("pk", "state", "sequence", "dispatched_at")
        .first()
    )


def _locked_blocker(message: Message, now: datetime) -> Message | None:
    """The closest blocker, its row locked until the caller's transaction ends (so it cannot move
    unseen: its transition, which locks the same row, comes after and finds our waiting_for)."""
    while True:
        blocker = ordering_blocker(message, now)
        if blocker is None:
            return None
        still = (
            Message.objects.select_for_update()
            .filter(pk=blocker.pk)
            .filter(blocking(message, now))
            .only("pk", "state", "sequence", "dispatched_at")
            .first()
        )
        if still is not None:
            return still
        # it moved while we looked: the next closest may hold us back instead


def ordering_hold(message: Message, *, now: datetime) -> bool:
    """At acceptance, inside the accepting transaction: if an earlier message with the key is
    still ahead, record what this one waits for and return True (the caller does not publish it)."""
    blocker = _locked_blocker(message, now)
    if blocker is None:
        return False
    Message.objects.filter(pk=message.pk).update(waiting_for_id=blocker.pk, waiting_since=now)
    message.waiting_for_id, message.waiting_since = blocker.pk, now
    return True


def ordering_wait(message: Message, *, now: datetime | None = None) -> bool:
    """Step aside if an earlier message with the same key holds this one back; True if it waits.

    The blocker's row is locked while this one records that it waits, so the blocker cannot move
    in between and miss releasing it: its transition (which locks the same row) comes after, and
    finds this waiter; or came before, and the locked re-read sees it moved.
    """
    now = now or timezone.now()
    with transaction.atomic():
        blocker = _locked_blocker(message, now)
        if blocker is None:
            if message.waiting_for_id is not None:
                Message.objects.filter(pk=message.pk).update(waiting_for=None, waiting_since=None)
                message.waiting_for_id = None
            return False
        fields: dict[str, Any] = {
            "waiting_for_id": blocker.pk,
            "waiting_since": message.waiting_since or now,
            "lease_expires_at": None,
            "enqueued_at": now,
            "next_attempt_at": None,
        }
        countdown = None
        if blocker.state == MessageState.DISPATCHED:
            # Waiting for its receipt, but not past the timeout: look again then.
            timeout = timedelta(seconds=messaging_setting("ORDERING_RECEIPT_TIMEOUT_SECONDS"))
            fields["next_attempt_at"] = min(blocker.dispatched_at + timeout, message.expires_at)
            countdown = max(0.0, (fields["next_attempt_at"] - now).total_seconds())
            if countdown > messaging_setting("MAX_COUNTDOWN_SECONDS"):
                countdown = None  # the sweeper enqueues it when due
        Message.objects.filter(pk=message.pk, state=MessageState.ACCEPTED).update(**fields)
        if countdown is not None:
            transaction.on_commit(
                lambda: message_publish(
                    message_id=message.pk, channel=message.channel, priority=message.priority, countdown=countdown
                )
            )
    logger.info(
        "message %s (sequence %d) waits for %s (sequence %d, %s)",
        message.pk,
        message.sequence,
        blocker.pk,
        blocker.sequence,
        blocker.state,
        extra={
            "event": "ordering_wait",
            "message_id": str(message.pk),
            "ordering_sequence": message.sequence,
            "waiting_for": str(blocker.pk),
            "waiting_for_state": blocker.state,
        },
    )
    return True


def ordering_release(*, message_id: Any) -> int:
    """Publish the messages waiting for this one (it moved); each looks again for itself."""
    now = timezone.now()
    waiters = list(
        Message.objects.filter(waiting_for_id=message_id, state=MessageState.ACCEPTED).values_list(
            "pk", "channel", "priority"
        )
    )
    if not waiters:
        return 0
    rows_update_in_key_order(Message.objects.filter(pk__any=[pk for pk, _, _ in waiters]), enqueued_at=now)
    for pk, channel, priority in waiters:
        message_publish(message_id=pk, channel=channel, priority=priority)
    return len(waiters)
