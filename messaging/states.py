"""The message lifecycle: states and the one table of legal transitions."""

from __future__ import annotations

from django.db import models


class MessageState(models.TextChoices):
    ACCEPTED = "accepted"
    DISPATCHED = "dispatched"
    DELIVERED = "delivered"
    READ = "read"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"


# Source state -> the states it may move to. Receipts can overtake our own writes (a
# "delivered" callback before the worker records "dispatched"), so the happy path may skip
# forward; it never moves back. FAILED, EXPIRED and DEAD_LETTERED -> ACCEPTED is an operator's
# replay of a dead letter (messaging.replay: a new send generation), nothing else.
TRANSITIONS: dict[str, frozenset[str]] = {
    MessageState.ACCEPTED: frozenset(
        {
            MessageState.DISPATCHED,
            MessageState.DELIVERED,
            MessageState.READ,
            MessageState.UNDELIVERED,
            MessageState.FAILED,
            MessageState.EXPIRED,
            MessageState.CANCELLED,
            MessageState.DEAD_LETTERED,
        }
    ),
    MessageState.DISPATCHED: frozenset(
        {MessageState.DELIVERED, MessageState.READ, MessageState.UNDELIVERED, MessageState.FAILED}
    ),
    MessageState.DELIVERED: frozenset({MessageState.READ}),
    MessageState.READ: frozenset(),
    # Only for a fallback on silence (messaging.silence, docs/silence-fallback.md): an undelivered
    # message of an opted-in category that a second copy was sent for, through the route's next
    # provider or channel, is dispatched again, once (GUARDED_TRANSITIONS: nothing else may).
    MessageState.UNDELIVERED: frozenset({MessageState.DISPATCHED}),
    # Given up on: replayed (back to accepted) or closed for good by cancelling it (only if it was
    # never dispatched: message_cancel checks), which also lets later messages with its ordering
    # key go on when ORDERING_DEAD_PREDECESSOR is "hold".
    MessageState.FAILED: frozenset({MessageState.ACCEPTED, MessageState.CANCELLED}),
    MessageState.EXPIRED: frozenset({MessageState.ACCEPTED, MessageState.CANCELLED}),
    MessageState.CANCELLED: frozenset(),
    MessageState.DEAD_LETTERED: frozenset({MessageState.ACCEPTED, MessageState.CANCELLED}),
}

# The event source that names the fallback on silence (messaging.models.EventSource.FALLBACK).
SILENCE_FALLBACK_SOURCE = "fallback"
# Transitions only one source may make: a late `sent` receipt after `undelivered`, or a worker
# recording a dispatch that a receipt overtook, must never move an undelivered message back.
GUARDED_TRANSITIONS: dict[tuple[str, str], str] = {
    (MessageState.UNDELIVERED, MessageState.DISPATCHED): SILENCE_FALLBACK_SOURCE,
}


def transition_allowed(*, from_state: str, to_state: str, source: str) -> bool:
    """Whether the table allows this move for this source (GUARDED_TRANSITIONS name their source)."""
    if to_state not in TRANSITIONS[from_state]:
        return False
    guard = GUARDED_TRANSITIONS.get((from_state, to_state))
    return guard is None or guard == source


# For each target, the states it may be entered from: the WHERE clause of the conditional UPDATE.
ALLOWED_SOURCES: dict[str, frozenset[str]] = {
    target: frozenset(source for source, targets in TRANSITIONS.items() if target in targets)
    for target in MessageState.values
}

# States after which nothing more happens to the message (apart from a replay of a dead letter,
# and a fallback on silence for an undelivered message of an opted-in category).
FINAL_STATES: frozenset[str] = frozenset(
    {
        MessageState.READ,
        MessageState.UNDELIVERED,
        MessageState.FAILED,
        MessageState.EXPIRED,
        MessageState.CANCELLED,
        MessageState.DEAD_LETTERED,
    }
)
# "Done" for a sender: the provider has it or it will never be sent. Delivered may still go to read.
SETTLED_STATES: frozenset[str] = FINAL_STATES | {MessageState.DISPATCHED, MessageState.DELIVERED}
# Given up on before reaching the recipient: each entry parks a dead letter that can be replayed.
DEAD_LETTER_STATES: frozenset[str] = frozenset({MessageState.FAILED, MessageState.EXPIRED, MessageState.DEAD_LETTERED})
DEAD_LETTER_STATE_CHOICES: list[tuple[str, str]] = [(s, MessageState(s).label) for s in sorted(DEAD_LETTER_STATES)]

# The timestamp column each state stamps when entered.
TIMESTAMP_FIELD: dict[str, str] = {state: f"{state}_at" for state in MessageState.values}
