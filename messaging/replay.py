"""Replaying dead letters: one service behind the command, the admin actions and the API.

A replay moves the message back to `accepted` with a new send generation (a new provider
idempotency token), a fresh retry budget and the deadline its policy allows, and publishes it on
commit. Each dead letter is claimed by a conditional UPDATE in the same transaction as the
message's transition, so two replays racing over the same dead letters send each message once.

A dead letter of kind `callback` (a status callback given up on) is replayed the same way: its
callback is pending again with no attempts, due now, with a fresh retry window (`retry_from`)
and the same webhook-id (receivers de-duplicate on it), and delivery is kicked on commit.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from messaging.callbacks.trigger import callbacks_kick
from messaging.models import UNKNOWN_OUTCOMES, Callback, CallbackState, DeadLetter, DeadLetterKind, Receipt
from messaging.publish import message_publish
from messaging.routing import ReplayDeadline, RetryPolicy, retry_policy_for
from messaging.services import message_transition
from messaging.states import MessageState
from messaging.suppressions.selectors import SuppressionIndex
from providers.registry import PROVIDER_CLASSES, provider_class

logger = logging.getLogger(__name__)

# Dead letters read per query while replaying: bounded memory however many are selected.
CHUNK_SIZE = 500


class SkipReason:
    """Why a selected dead letter was not replayed (keys of ReplayReport.skipped)."""

    PAST_DEADLINE = "past_deadline"  # its deadline passed and its policy keeps it: force to send anyway
    ARRIVED = "provider_reported_delivery"  # a receipt says the given-up send arrived after all: force to resend
    ALREADY_REPLAYED = "already_replayed"  # another replay took it first
    MOVED_ON = "message_moved_on"  # the message is no longer in the state it was parked in
    ENDPOINT_DISABLED = "endpoint_disabled"  # a callback's endpoint is disabled: enable it, then replay
    # The address is still on the client's suppression list (every hop's, for a message with
    # fallback channels): lift the suppression, then replay. `force` does not override it.
    SUPPRESSED = "suppressed"


@dataclass
class ReplayReport:
    replay_id: uuid.UUID
    dry_run: bool
    selected: int = 0
    replayed: int = 0
    skipped: Counter = field(default_factory=Counter)
    replayed_by_kind: Counter = field(default_factory=Counter)  # DeadLetterKind -> replayed
    dead_letter_ids: list[int] = field(default_factory=list)  # every one handled
    message_ids: list[str] = field(default_factory=list)  # the messages replayed (or, dry, that would be)
    callback_ids: list[int] = field(default_factory=list)  # the callbacks replayed (or would be)

    def as_dict(self) -> dict:
        return {
            "replay_id": str(self.replay_id),
            "dry_run": self.dry_run,
            "selected": self.selected,
            "replayed": self.replayed,
            "replayed_by_kind": {kind: self.replayed_by_kind[kind] for kind in DeadLetterKind.values},
            "skipped": dict(self.skipped),
            "dead_letter_ids": self.dead_letter_ids,
            "message_ids": self.message_ids,
            "callback_ids": self.callback_ids,
        }


def replay_deadline(
    *,
    now: datetime,
    expires_at: datetime,
    created_at: datetime,
    deadline_from_sender: bool,
    policy: RetryPolicy,
    force: bool,
) -> datetime | None:
    """The deadline a replayed message gets, or None when it must not be sent again.

    A deadline the sender gave is kept; a default one is renewed when the policy says so. Past a
    kept deadline only `force` sends it, with a fresh deadline as long as its original lifetime.
    """
    if not deadline_from_sender and policy.replay_deadline == ReplayDeadline.RENEW:
        return now + timedelta(seconds=policy.ttl_seconds)
    if expires_at > now:
        return expires_at
    if force:
        return now + max(expires_at - created_at, timedelta(seconds=1))
    return None


def _lookup_first(dead_letter: DeadLetter) -> bool:
    """Whether the replayed send must first ask the provider about the send given up on.

    A provider that cannot be asked (SMTP) is not: replaying is the operator's decision to resend.
    """
    if not dead_letter.unknown_outcome:
        return False
    unknown = [a for a in dead_letter.attempts if a["outcome"] in UNKNOWN_OUTCOMES]
    name = unknown[-1]["provider"] if unknown else dead_letter.provider
    return name in PROVIDER_CLASSES and provider_class(name).supports_lookup


def dead_letters_replay(
    *,
    selection: QuerySet[DeadLetter],
    actor: str,
    via: str,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[], None] | None = None,
) -> ReplayReport:
    """Replay each dead letter of `selection` in its order (oldest first, as selectors give it).

    `actor` names who asked (a user, a client, an OS account) and `via` the door (an EventSource):
    both are stored on the dead letter and in the message's timeline. `progress` is called once
    per dead letter handled. Rows are read in chunks, so a large replay does not load them all.
    """
    report = ReplayReport(replay_id=uuid.uuid4(), dry_run=dry_run)
    ids = list(selection.values_list("pk", flat=True))
    for start in range(0, len(ids), CHUNK_SIZE):
        chunk = list(
            DeadLetter.objects.filter(pk__in=ids[start : start + CHUNK_SIZE])
            .select_related("message", "callback__endpoint")
            .order_by("created_at", "pk")
        )
        arrived = _messages_with_delivery_receipts([d.message_id for d in chunk if d.kind == DeadLetterKind.MESSAGE])
        suppressions = _suppressions_of([d.message for d in chunk if d.kind == DeadLetterKind.MESSAGE])
        for dead_letter in chunk:
            report.selected += 1
            report.dead_letter_ids.append(dead_letter.pk)
            if dead_letter.kind == DeadLetterKind.CALLBACK:
                skipped = _replay_callback(dead_letter, report, actor, via, dry_run)
            else:
                skipped = (
                    SkipReason.SUPPRESSED
                    if dead_letter.replayed_at is None and _all_hops_suppressed(suppressions, dead_letter.message)
                    else _replay_one(dead_letter, report, actor, via, force, dry_run, dead_letter.message_id in arrived)
                )
            if skipped is None:
                report.replayed += 1
                report.replayed_by_kind[dead_letter.kind] += 1
                if dead_letter.kind == DeadLetterKind.CALLBACK:
                    report.callback_ids.append(dead_letter.callback_id)
                else:
                    report.message_ids.append(str(dead_letter.message_id))
            else:
                report.skipped[skipped] += 1
            if progress is not None:
                progress()
    if not dry_run:
        logger.info(
            "replay %s by %s via %s: %d replayed, skipped %s",
            report.replay_id,
            actor,
            via,
            report.replayed,
            dict(report.skipped) or "none",
        )
    return report


def _hops(message) -> list[tuple[str, str]]:
    """(channel, address) of the message's own hop and of each fallback channel."""
    return [(message.channel, message.to)] + [
        (channel, message.fallback_to.get(channel, "")) for channel in message.fallback_channels
    ]


def _suppressions_of(messages: list) -> SuppressionIndex:
    """The chunk's suppressions, every hop of every message, in one query."""
    return SuppressionIndex.load(
        (message.client_id, channel, address) for message in messages for channel, address in _hops(message) if address
    )


def _all_hops_suppressed(suppressions: SuppressionIndex, message) -> bool:
    """Whether no hop of the message may be sent now (the replay would only fail it again)."""
    if not suppressions:
        return False
    return all(
        suppressions.blocking(client_id=message.client_id, channel=channel, address=address, category=message.category)
        for channel, address in _hops(message)
        if address
    )


def _messages_with_delivery_receipts(message_ids: list) -> set:
    delivered = (MessageState.DELIVERED, MessageState.READ)
    return set(
        Receipt.objects.filter(message_id__in=message_ids, mapped_state__in=delivered).values_list(
            "message_id", flat=True
        )
    )


def _replay_one(
    dead_letter: DeadLetter, report: ReplayReport, actor: str, via: str, force: bool, dry_run: bool, arrived: bool
) -> str | None:
    """Replay one dead letter; the reason it was skipped, or None when it was (or would be) replayed."""
    if dead_letter.replayed_at is not None:
        return SkipReason.ALREADY_REPLAYED
    if arrived and not force:
        return SkipReason.ARRIVED
    now = timezone.now()
    message = dead_letter.message
    deadline = replay_deadline(
        now=now,
        expires_at=message.expires_at,
        created_at=message.created_at,
        deadline_from_sender=message.deadline_from_sender,
        policy=retry_policy_for(dead_letter.priority, dead_letter.category),
        force=force,
    )
    if deadline is None:
        return SkipReason.PAST_DEADLINE
    if dry_run:
        return None
    with transaction.atomic():
        claimed = DeadLetter.objects.filter(pk=dead_letter.pk, replayed_at__isnull=True).update(
            replayed_at=now, replayed_by=actor[:150], replayed_via=via, replay_id=report.replay_id
        )
        if not claimed:
            return SkipReason.ALREADY_REPLAYED
        applied = message_transition(
            message_id=dead_letter.message_id,
            to_state=MessageState.ACCEPTED,
            source=via,
            detail=(
                f"dead letter {dead_letter.pk} replayed by {actor} via {via} (replay {report.replay_id}); "
                f"send generation {dead_letter.send_generation + 1}"
            ),
            fields={
                "send_generation": F("send_generation") + 1,
                "failed_rounds": 0,
                "worker_loss_count": 0,
                "needs_provider_lookup": _lookup_first(dead_letter),
                "expires_at": deadline,
                "next_attempt_at": None,
                "lease_expires_at": None,
                "enqueued_at": now,
                "last_error_type": "",
                "last_error_code": "",
                "last_error_message": "",
            },
            extra_filter=Q(send_generation=dead_letter.send_generation),
        )
        if not applied:
            transaction.set_rollback(True)  # give the claim back: nothing happened
            return SkipReason.MOVED_ON
        transaction.on_commit(
            lambda: message_publish(message_id=message.pk, channel=message.channel, priority=message.priority)
        )
    return None


def _replay_callback(dead_letter: DeadLetter, report: ReplayReport, actor: str, via: str, dry_run: bool) -> str | None:
    """Make a dead callback pending again; the reason it was skipped, or None. `force` does not
    apply: nothing about a callback expires, and a disabled endpoint must be enabled first."""
    if dead_letter.replayed_at is not None:
        return SkipReason.ALREADY_REPLAYED
    callback = dead_letter.callback
    if callback.state != CallbackState.DEAD_LETTERED:
        return SkipReason.MOVED_ON
    if not callback.endpoint.enabled:
        return SkipReason.ENDPOINT_DISABLED
    if dry_run:
        return None
    now = timezone.now()
    with transaction.atomic():
        claimed = DeadLetter.objects.filter(pk=dead_letter.pk, replayed_at__isnull=True).update(
            replayed_at=now, replayed_by=actor[:150], replayed_via=via, replay_id=report.replay_id
        )
        if not claimed:
            return SkipReason.ALREADY_REPLAYED
        # The same webhook_id and sequence; the attempt log is kept (the history of both rounds).
        revived = Callback.objects.filter(
            pk=callback.pk, state=CallbackState.DEAD_LETTERED, endpoint__enabled=True
        ).update(
            state=CallbackState.PENDING,
            attempts=0,
            next_attempt_at=now,
            retry_from=now,
            lease_expires_at=None,
            dead_lettered_at=None,
            last_error="",
        )
        if not revived:
            transaction.set_rollback(True)  # give the claim back: nothing happened
            return SkipReason.MOVED_ON
        transaction.on_commit(callbacks_kick)
    logger.info(
        "callback %s (%s #%d of %s) replayed by %s via %s",
        callback.webhook_id,
        callback.event,
        callback.sequence,
        callback.message_id,
        actor,
        via,
    )
    return None
