"""The send path, one core for a critical message and a campaign batch: claim, send, record.

Every dispatch task, `messaging.dispatch` with one id, `messaging.dispatch_batch` with up to
BULK_BATCH_SIZE or `messaging.dispatch_bulk` with the next fair batch of a channel (messaging.fair),
runs `messages_dispatch`: the claimable messages are locked in key order and
leased in one transaction, which also writes the first round's in-progress attempt rows (a worker
killed mid-call leaves them behind, and the next claim looks those messages up at the provider
before any resend); then, round by round along each message's route, the round's provider calls
run at once on the process's send loop (messaging.send_loop), with no transaction open and no
row lock held, and their outcomes are recorded a few statements per round: acceptances all
together, the rest one by one (transient: the next hop next round; ambiguous: stays, looked up
next time; permanent: failed). A message whose route is spent waits for its retry (full-jitter
backoff), or is dead-lettered when its budget is spent.

A message that needs more than a plain send (an attempt lost with its worker, an unknown outcome
to look up, an ordering key, a passed deadline, no route, a rate-limited provider) is settled
here when it is claimed alone, as every critical and transactional message is: lost attempts
are closed (too many: dead-lettered), then expiry, no route, the look-up and the ordering wait
before any call, and a rate-limited provider's slot is waited for inline (up to the provider's
RATE_LIMIT_MAX_INLINE_WAIT_SECONDS, else it is rescheduled). Claimed among many, it is not
leased but published again as a task of its own, which claims it alone: its look-up or wait
would otherwise hold up the batch's round, and a round of rate-limited calls at once would
arrive bunched; a few dozen a second gain nothing from batching.

No suppressed message is handed to any provider (docs/suppressions.md): the claim reads the
suppression lists of every hop of every claimed message in one query (SuppressionIndex), and
every round, the claim's first and each later one, skips a hop whose address is suppressed for
the message's client and category, as it skips a hop whose circuit is open. A message whose every
hop is suppressed fails (`suppressed`) and is never retried; since every retry is a claim, a
suppression added while a message waits stops it there. A provider's refusal of the address
itself (opted out, cannot receive) adds a suppression, and the message leaves that address: no
other provider of the same channel and address is tried, another channel's address may be.

Quiet hours (messaging.quiet_hours, docs/quiet-hours.md) are kept at every claim, as at acceptance:
a message claimed while its recipient is inside the window of its client and category (a retry
falling into it, a message that waited in a queue) is not leased and costs no attempt; it gets
next_attempt_at at the window's end and the sweeper publishes it then. The client's own
configuration comes with the locked rows (a subquery), the zones from tz data: no query a message.

No free-form WhatsApp message goes outside its recipient's customer-service window (docs/whatsapp.md):
the claim reads the windows of every free-form WhatsApp hop of every claimed message in one query
(messaging.whatsapp_session, kept from the inbound webhook), and a hop whose window is closed is
skipped like a suppressed one: the message goes to its fallback channel, or, with none left, fails
at once (`outside_session_window`, never retried). A template message's WhatsApp hop always goes.

The route's order follows the providers' conditions (docs/routing.md): once per message and claim,
a degraded provider goes behind its channel's healthy ones (but for a probe share of traffic), a
drained one behind all of them, and weights share the first place; every hop is still tried on
failure. The conditions are read once per claim (messaging.route_health.provider_routes).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F, OuterRef, Subquery
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.fair import bulk_pick_fair, fair_sharing
from messaging.lookup import message_resolve_unknown_outcome, send_request
from messaging.metrics import messages_suppressed_count
from messaging.models import (
    EARLY_TOLERANCE,
    ApiClient,
    AttemptOutcome,
    DispatchAttempt,
    ErrorType,
    EventSource,
    Message,
    SuppressionReason,
)
from messaging.ordering import ordering_wait
from messaging.outcomes import (
    RELEASE,
    accepted_detail,
    attempt_finish_failed,
    attempt_report,
    attempts_start,
    error_fields,
    message_dead_letter,
    message_record_dispatched_after_receipt,
    message_record_expired,
    message_record_failed,
    message_reschedule,
    message_schedule_retry,
)
from messaging.publish import message_publish
from messaging.quiet_hours import QuietHoursPolicy, deadline_note, quiet_hours_policy
from messaging.route_health import hops_ordered, provider_routes
from messaging.routing import Channel, Hop, message_route
from messaging.rows import rows_update, rows_update_in_key_order
from messaging.send_loop import send_loop
from messaging.services import message_transition, messages_transition
from messaging.states import MessageState
from messaging.suppressions.selectors import Blocker, SuppressionIndex, exempt_categories, suppression_address
from messaging.suppressions.services import suppression_add
from messaging.whatsapp_session import whatsapp_session_window, whatsapp_sessions_open
from providers.base import validity_too_short
from providers.conf import providers_setting
from providers.guards import circuit_breaker, rate_limiter, seconds_until_half_open
from providers.ratelimit import wait_for_slot
from providers.registry import get_provider, provider_class
from providers.types import (
    AmbiguousProviderError,
    DeadlineTooShortError,
    PermanentProviderError,
    ProviderError,
    SendResult,
    TransientProviderError,
)

logger = logging.getLogger(__name__)

# The three kinds an adapter sorts its failures into; anything else is a bug and propagates.
SEND_ERRORS = (TransientProviderError, AmbiguousProviderError, PermanentProviderError)
# A provider's refusals of the address itself, which suppress it for the client: the recipient
# opted out (covers the client's usual categories, as a STOP), or the address cannot receive
# (covers every category, the opt-out-exempt ones too).
ADDRESS_REFUSALS = {ErrorType.OPTED_OUT: False, ErrorType.INVALID_RECIPIENT: True}
_NO_SUPPRESSIONS = SuppressionIndex({}, {})


@dataclass
class _Send:
    """One message's way through its route within a batch."""

    message: Message
    hops: list[Hop]
    lost: bool = False  # an attempt of it was left in progress by a worker that died
    index: int = 0  # the hop being tried
    last_error: ProviderError | None = None
    left_for: str = ""  # why the previous hop was left (an error type, or "suppressed"), for the notes
    suppressions: SuppressionIndex = _NO_SUPPRESSIONS  # the claim's, shared by its messages
    # The WhatsApp numbers of its free-form hops whose customer-service window is closed: skipped.
    closed_sessions: frozenset[str] = frozenset()
    # The route's configured first provider when its routing conditions or weights put another first.
    moved_ahead_of: str = ""
    # (channel, address) a provider refused in this claim (opted out, cannot receive): left for good.
    refused: dict[tuple[str, str], ProviderError] = field(default_factory=dict)
    met_suppression: bool = False  # counted in messages_suppressed_count once
    tried: bool = False  # some provider was actually called (the round counts against the budget)
    settled: bool = False
    # This round's call:
    permit: Any = None
    attempt: DispatchAttempt | None = None
    started: float = 0.0
    ended: float = 0.0
    result: SendResult | None = None
    error: ProviderError | None = None
    bug: BaseException | None = None
    sent: bool = False  # the request was made (a round out of time skips the rest)

    @property
    def hop(self) -> Hop:
        return self.hops[self.index]


def messages_dispatch(*, message_ids: list[str] | None = None, fair_channel: str | None = None) -> int:
    """Send these messages; ids already claimed, sent or moved on are skipped (a duplicate or
    early task finds nothing to claim). With `fair_channel` instead of ids: the next batch of the
    channel's bulk messages, shared fairly between clients (messaging.fair). Returns how many
    messages this call claimed."""
    lease, claimed, sends, first_round, unstarted = _claim(message_ids, fair_channel)
    leased = [send.message for send in sends + unstarted]
    released: set[Any] = set()  # messages whose lease a final write has already given up
    try:
        for send in unstarted:
            if _settle_before_sending(send):
                released.add(send.message.pk)  # its final write gave the lease up
            else:
                sends.append(send)
        if sends:
            _walk(sends, lease, first_round, released, alone=len(claimed) == 1)
    finally:
        # Normally released by each message's final write; this covers an exception on the way
        # and the rarer endings (a healthy batch has nothing left here: no statement).
        left = [message.pk for message in leased if message.pk not in released]
        if left:
            rows_update_in_key_order(
                Message.objects.filter(pk__any=left, lease_expires_at=lease), lease_expires_at=None
            )
    return len(claimed)


def _claim(
    message_ids: list[str] | None, fair_channel: str | None = None
) -> tuple[datetime, list[Message], list[_Send], list[_Send], list[_Send]]:
    """Lock the batch's rows (one order for every claimer), keep the claimable ones, lease them,
    and start the first round of the plain sends: its attempt rows and counters go in with the
    lease, one transaction and one write of each row for what used to be three (bench/README.md,
    profiles).

    Returns the lease, the claimed messages, the plain sends, the first round's calls and the
    leased messages whose first round waits for what only a message claimed alone gets: its
    settling and its rate limit's slot (_separate_plain_sends). Only primary keys reach the SQL: a predicate
    on state lets PostgreSQL pick the state index, which it believes selective until statistics
    catch up with a campaign that has just added 200,000 accepted rows, and then each claim scans
    all of them (117 ms measured, for 100 rows). The claimable test (Message.is_claimable, the
    same definition as Message.objects.claimable) runs here instead, on locked rows, so nothing
    can change them in between. The lease value names this claim; a few random microseconds
    keep it unique. A fair claim (fair_channel) picks its ids in the same transaction, locked
    (messaging.fair.bulk_pick_fair; its own SQL asks for the state, through message_bulk_fair).
    """
    now = timezone.now()
    lease = now + timedelta(
        seconds=messaging_setting("DISPATCH_LEASE_SECONDS"), microseconds=random.randrange(1, 1_000_000)
    )
    with transaction.atomic():
        if fair_channel is not None:
            if not fair_sharing(fair_channel):  # settings changed since it was published: the sweeper's
                return lease, [], [], [], []
            message_ids = bulk_pick_fair(channel=fair_channel, size=messaging_setting("BULK_BATCH_SIZE"), now=now)
            if not message_ids:
                return lease, [], [], [], []
        rows = list(
            Message.objects.select_for_update()
            .filter(pk__any=message_ids)
            .order_by("pk")
            .only(*_SEND_FIELDS, "state", "lease_expires_at", "next_attempt_at")
            # The client's own quiet hours, read with the rows (a subquery, no row of it locked).
            .annotate(
                client_quiet_hours=Subquery(
                    ApiClient.objects.filter(pk=OuterRef("client_id")).values("quiet_hours")[:1]
                )
            )
        )
        claimed = [message for message in rows if message.is_claimable(now)]
        claimed = _hold_for_quiet_hours(claimed, now)
        if not claimed:
            return lease, [], [], [], []
        sends, unstarted, handed_back = _separate_plain_sends(claimed, now)
        first_round = _round_start(sends, in_claim=True)
        rows_update(
            Message.objects.all(),
            {
                s.message.pk: {
                    "lease_expires_at": lease,
                    "enqueued_at": None,
                    "attempt_count": s.message.attempt_count,  # the rows are locked: the values stand
                    "provider": s.message.provider,
                }
                for s in sends + unstarted
            },
        )
        if handed_back:  # never leased: published again once this commits
            fields: dict[str, Any] = {"enqueued_at": timezone.now()}
            if fair_channel is not None:
                # Only a lost attempt brings a message here (the fair pick leaves out every other
                # reason): it will be looked up anyway (_record_lost_attempts). Marked now, the next
                # fair claims leave it to its own task instead of handing it back again.
                fields["needs_provider_lookup"] = True
            Message.objects.filter(pk__any=[m.pk for m in handed_back]).update(**fields)
    for message in handed_back:
        message_publish(message_id=message.pk, channel=message.channel, priority=message.priority)
    return lease, claimed, sends, first_round, unstarted


def _hold_for_quiet_hours(messages: list[Message], now: datetime) -> list[Message]:
    """The messages that may be sent now; the others, claimed while their recipient is in quiet
    hours (a retry falling into the window, a message that waited in the queue), wait for the
    window's end: next_attempt_at, no task (the sweeper publishes them when due), no lease and no
    attempt spent. Deadlines win: one whose deadline comes first waits all the same and is expired
    by the sweeper, with a note saying why. A passed deadline is left to the settling (expired).
    Pure but for the write: the zones come from tz data, the client's configuration with the rows."""
    held: dict[Any, dict[str, Any]] = {}
    notes: dict[Any, str] = {}
    policies: dict[Any, QuietHoursPolicy] = {}
    default = quiet_hours_policy()
    for message in messages:
        own = getattr(message, "client_quiet_hours", None)
        if own is None:
            policy = default
        else:
            policy = policies.get(message.client_id) or policies.setdefault(message.client_id, quiet_hours_policy(own))
        if not policy.config or message.expires_at <= now:
            continue
        release = policy.release(
            priority=message.priority,
            category=message.category,
            channel=message.channel,
            to=message.to,
            timezone_name=message.recipient_timezone,
            at=now,
        )
        # Within the claim's tolerance (a task may fire a moment early): not worth another round trip.
        if release is None or release - now <= EARLY_TOLERANCE:
            continue
        held[message.pk] = {"next_attempt_at": release, "enqueued_at": None}
        if release > message.expires_at:
            notes[message.pk] = deadline_note(release=release, expires_at=message.expires_at)
        logger.info("message %s: quiet hours for its recipient, waits until %s", message.pk, release.isoformat())
    if not held:
        return messages
    rows_update(Message.objects.all(), held)  # the rows are locked by the claim
    if notes:
        rows_update(Message.objects.all(), {pk: {"last_error_message": note} for pk, note in notes.items()})
    return [message for message in messages if message.pk not in held]


# What the send path reads of a message (a deferred field would cost a query of its own, not an error).
_SEND_FIELDS = (
    "id",
    "client_id",
    "channel",
    "to",
    "body",
    "subject",
    "priority",
    "category",
    "expires_at",
    "send_at",
    "recipient_timezone",
    "template",
    "template_variables",
    "fallback_channels",
    "fallback_to",
    "send_generation",
    "attempt_count",
    "failed_rounds",
    "needs_provider_lookup",
    "sequence",
    "provider",
    "accepted_at",
    "created_at",
    # read only when a message is settled before its send (lost attempts, ordering)
    "worker_loss_count",
    "ordering_key",
    "ordering_mode",
    "waiting_for",
    "waiting_since",
)


def _separate_plain_sends(messages: list[Message], now: datetime) -> tuple[list[_Send], list[_Send], list[Message]]:
    """The plain sends of the claim; the ones that need more than a send (settling before it, or
    a rate limit's slot), left unstarted when claimed alone; and, claimed among many, those to
    hand back as tasks of their own (the module's docstring says why)."""
    lost = set(
        DispatchAttempt.objects.filter(
            message_id__any=[m.pk for m in messages], outcome=AttemptOutcome.IN_PROGRESS
        ).values_list("message_id", flat=True)
    )
    alone = len(messages) == 1
    sends, unstarted, handed_back = [], [], []
    routes, moved = _routes_ordered(messages)
    # One look-up for the whole claim: every hop of every message (its later rounds included).
    suppressions = SuppressionIndex.load(
        (message.client_id, hop.channel, hop.to) for message in messages for hop in routes[message.pk]
    )
    # And one for the customer-service windows of every free-form WhatsApp hop (a template goes anyway).
    free_form = {
        message.pk: {hop.to for hop in routes[message.pk] if hop.channel == Channel.WHATSAPP}
        for message in messages
        if not message.template
    }
    open_sessions = whatsapp_sessions_open(addresses=set().union(*free_form.values()), now=now)
    for message in messages:
        hops = routes[message.pk]
        closed = frozenset(free_form.get(message.pk, set()) - open_sessions)
        send = _Send(message, hops, lost=message.pk in lost, suppressions=suppressions, closed_sessions=closed)
        send.moved_ahead_of = moved.get(message.pk, "")
        if not (_needs_settling(send, now) or _rate_limited(hops[0].provider)):
            sends.append(send)
        elif alone:
            unstarted.append(send)
        else:
            handed_back.append(message)
    return sends, unstarted, handed_back


def _routes_ordered(messages: list[Message]) -> tuple[dict[Any, list[Hop]], dict[Any, str]]:
    """Each message's route, ordered once by the routes' conditions and weights (degraded and
    drained providers behind the others, a probe share kept: messaging.route_health.hops_ordered),
    and, for the messages whose first provider that changed, the configured first one (for the
    attempt's note). The conditions are read once per claim (cached per process), nothing per
    message; the list serves every round of the claim, so a message walks one order to its end.
    Its next claim draws again."""
    states = provider_routes()
    share = messaging_setting("ROUTE_PROBE_SHARE")
    routes: dict[Any, list[Hop]] = {}
    moved: dict[Any, str] = {}
    for message in messages:
        configured = message_route(
            channel=message.channel,
            to=message.to,
            fallback_channels=message.fallback_channels,
            fallback_to=message.fallback_to,
        )
        hops = hops_ordered(configured, priority=message.priority, states=states, draw=random.random, probe_share=share)
        routes[message.pk] = hops
        if hops is not configured and hops and hops[0] != configured[0]:
            moved[message.pk] = configured[0].provider
    return routes, moved


def _needs_settling(send: _Send, now: datetime) -> bool:
    message = send.message
    return (
        send.lost  # its worker died mid-call: look it up first
        or message.worker_loss_count >= messaging_setting("MAX_WORKER_LOSSES")
        or message.needs_provider_lookup
        or message.sequence is not None  # may have to wait for an earlier one with its key
        or message.expires_at <= now
        or not send.hops
    )


def _settle_before_sending(send: _Send) -> bool:
    """What comes before any call for a message claimed alone, in this order: its lost attempts
    (too many: dead-lettered), its deadline, its route, an unknown outcome looked up, its turn
    among its ordering key's messages. Returns True when that settled it for now (its final
    write released the lease), False when it may be sent."""
    message, now = send.message, timezone.now()
    if send.lost:
        _record_lost_attempts(message, now)
    if message.worker_loss_count >= messaging_setting("MAX_WORKER_LOSSES"):
        message_dead_letter(
            message=message,
            error_type=ErrorType.WORKER_LOST,
            code="",
            reason=f"its worker died {message.worker_loss_count} times",
        )
        return True
    if message.expires_at <= now:
        message_transition(
            message_id=message.pk,
            to_state=MessageState.EXPIRED,
            source=EventSource.WORKER,
            detail="deadline passed before dispatch",
            fields={**RELEASE, "last_error_type": ErrorType.EXPIRED},
        )
        return True
    if not send.hops:
        no_route = PermanentProviderError("no provider is configured", error_type=ErrorType.NO_ROUTE)
        message_record_failed(message=message, error=no_route)
        return True
    if message.needs_provider_lookup and message_resolve_unknown_outcome(message=message, route=send.hops):
        return True
    # An earlier message with the same ordering key goes first; it releases this one.
    return message.sequence is not None and ordering_wait(message)


def _record_lost_attempts(message: Message, now: datetime) -> None:
    """Close attempts left in progress by a worker that died (we hold the lease, so theirs
    expired) and count them against the message.

    One transaction: an attempt closed as lost is no longer in progress, so if this worker died
    before the flag was written, the next claim would see neither and send again (seen in the
    chaos test: a duplicate). The message first, as every writer of both locks it first."""
    with transaction.atomic():
        Message.objects.filter(pk=message.pk).update(needs_provider_lookup=True)
        lost = DispatchAttempt.objects.filter(message=message, outcome=AttemptOutcome.IN_PROGRESS).update(
            outcome=AttemptOutcome.WORKER_LOST, ended_at=now, error_type=ErrorType.WORKER_LOST
        )
        if lost:
            Message.objects.filter(pk=message.pk).update(worker_loss_count=F("worker_loss_count") + lost)
    # The dead worker may have reached the provider: look before sending again.
    message.needs_provider_lookup = True
    if lost:
        message.worker_loss_count += lost
        logger.warning("message %s: %d attempt(s) lost with their worker", message.pk, lost)


def _rate_limited(provider: str) -> bool:
    """A provider with a rate limit takes sends one slot at a time: a round of them at once would
    arrive bunched whenever this process is short of CPU. A message claimed alone waits for each
    slot right before its call; batching buys nothing at a few dozen a second."""
    return not rate_limiter(provider).limit.unlimited


def _hand_back(messages: list[Message], lease: datetime) -> None:
    """Give up our lease on these and publish each as its own dispatch task."""
    if not messages:
        return
    now = timezone.now()
    rows_update_in_key_order(
        Message.objects.filter(pk__any=[m.pk for m in messages], lease_expires_at=lease),
        lease_expires_at=None,
        enqueued_at=now,
    )
    for message in messages:
        message_publish(message_id=message.pk, channel=message.channel, priority=message.priority)


def _walk(sends: list[_Send], lease: datetime, calling: list[_Send], released: set[Any], *, alone: bool) -> None:
    """Round by round, every message tries its next hop; a round's calls run at once. `calling`
    is the first round, started by the claim (empty when it left the sends unstarted)."""
    loop = send_loop()
    lease_s = messaging_setting("DISPATCH_LEASE_SECONDS")
    active = sends
    while True:
        if calling:
            # Every call of the round ends before the lease does (at least half of it was left).
            budget_s = (lease - timezone.now()).total_seconds() - lease_s / 4
            loop.run(_call_all(calling, budget_s))
            _breakers_record(calling)
            _record(calling, released)
        active = [s for s in active if not s.settled]
        if not active:
            return
        if timezone.now() > lease - timedelta(seconds=lease_s / 2):
            # Not enough lease left for another round of calls (the lease outlives two provider
            # timeouts, a round takes at most one): their own tasks finish these.
            logger.warning("dispatch: %d message(s) handed back, the lease is running out", len(active))
            _hand_back([s.message for s in active], lease)
            released.update(s.message.pk for s in active)
            return
        _skip_unusable(active, in_claim=False)  # before a rate limit's slot is waited for
        for send in active:
            if send.index >= len(send.hops):
                _route_spent(send)
                send.settled = True
                released.add(send.message.pk)
        active = [s for s in active if not s.settled]
        if not active:
            return
        _throttle(active, lease, released, alone=alone)
        active = [s for s in active if not s.settled]
        calling = _round_start(active, in_claim=False)


def _throttle(active: list[_Send], lease: datetime, released: set[Any], *, alone: bool) -> None:
    """Sends whose next hop is rate-limited: alone, it waits for its slot here (a short wait
    inline, a longer one rescheduled without spending its budget); among many, each is handed
    back as a task of its own."""
    throttled = [s for s in active if _rate_limited(s.hop.provider)]
    if not throttled:
        return
    if not alone:
        _hand_back([s.message for s in throttled], lease)
    for send in throttled:
        if alone:
            wait_s = wait_for_slot(rate_limiter(send.hop.provider))  # 0.0: a slot is ours (may have slept for it)
            if not wait_s:
                continue
            # Our own throttle, not a failure: the same route, a little later, budget untouched.
            message_reschedule(message=send.message, wait_s=wait_s)
        send.settled = True
        released.add(send.message.pk)


def _round_start(active: list[_Send], *, in_claim: bool) -> list[_Send]:
    """A round's permits and its attempt rows, before any call: a worker killed mid-call leaves
    its in-progress rows behind, and the next claim looks those messages up before sending again.
    A hop whose circuit is open is recorded as skipped; the message moves on to its next hop.
    A hop whose address is suppressed, or whose provider's shortest validity is more than the time
    left, is skipped first, the same way (a message with no hop left is settled by _walk).
    Returns the round's calls. In the claim, the counters are written with the lease."""
    _skip_unusable(active, in_claim=in_claim)
    active = [s for s in active if s.index < len(s.hops)]
    _circuit_permits(active)
    skipped = [s for s in active if s.permit is None]
    calling = [s for s in active if s.permit is not None]
    if skipped:
        attempts_start(
            starts=[(s.message, s.hop, f"skipped: {s.hop.provider} circuit open") for s in skipped],
            outcome=AttemptOutcome.SKIPPED,
            counters=not in_claim,
        )
        for send in skipped:
            send.last_error = TransientProviderError(
                f"{send.hop.provider} circuit open", error_type=ErrorType.CIRCUIT_OPEN
            )
            send.left_for = ErrorType.CIRCUIT_OPEN
            send.index += 1
    if calling:
        attempts = attempts_start(
            starts=[(s.message, s.hop, _hop_note(s)) for s in calling],
            counters=not in_claim,
        )
        for send, attempt in zip(calling, attempts, strict=True):
            send.attempt = attempt
            send.tried = True
    return calling


def _hop_suppressed(send: _Send, hop: Hop) -> str | None:
    """Why this hop may not be tried for this message (the suppression's reason), or None."""
    message = send.message
    if send.refused and (hop.channel, suppression_address(hop.channel, hop.to)) in send.refused:
        return SuppressionReason.PROVIDER_REPORTED  # what the refusal added (_address_refused)
    blocker = send.suppressions.blocking(
        client_id=message.client_id, channel=hop.channel, address=hop.to, category=message.category
    )
    return blocker.reason if blocker is not None else None


def _skip_unusable(active: list[_Send], *, in_claim: bool) -> None:
    """Move each send past the hops it may not be given to, an attempt row (skipped) each: an
    address suppressed, a free-form WhatsApp hop whose session window is closed, or a provider
    whose shortest validity is more than the message has left before its deadline (it would get a
    validity shorter than it takes: docs/deadlines.md). One attempts_start per layer of hops: it
    counts each message's attempts up once a call."""
    now = timezone.now()
    suppressions = _any_suppressed(active)
    while True:
        layer = []
        for send in active:
            if send.index < len(send.hops):
                reason = _hop_suppressed(send, send.hop) if suppressions else None
                if reason is not None:
                    layer.append((send, reason, ErrorType.SUPPRESSED, f"skipped: suppressed ({reason})"))
                    continue
                if suppressions and _hop_window_closed(send, send.hop):
                    layer.append(
                        (send, None, ErrorType.OUTSIDE_SESSION_WINDOW, "skipped: outside the WhatsApp session window")
                    )
                    continue
                too_short = _hop_short_of_time(send, send.hop, now)
                if too_short is not None:
                    layer.append((send, None, ErrorType.EXPIRED, f"skipped: {too_short}"))
        if not layer:
            return
        attempts_start(
            starts=[(s.message, s.hop, note) for s, _, _, note in layer],
            outcome=AttemptOutcome.SKIPPED,
            counters=not in_claim,
        )
        met = [s for s, reason, _, _ in layer if reason is not None and not (s.met_suppression or s.refused)]
        for send, reason, left_for, _ in layer:
            send.left_for = left_for
            if reason is not None:
                send.met_suppression = True
            send.index += 1
        # Each message that met its client's list: failed for it, or sent on another channel.
        for channel, count in Counter(s.message.channel for s in met).items():
            messages_suppressed_count(channel=channel, stage="dispatch", count=count)


def _any_suppressed(sends: list[_Send]) -> bool:
    """Whether any of these may meet a suppressed hop (nearly never in a campaign: no work then)."""
    return any(send.refused or send.suppressions or send.closed_sessions for send in sends)


def _hop_window_closed(send: _Send, hop: Hop) -> bool:
    """A free-form WhatsApp hop to a number whose customer-service window is closed."""
    return hop.channel == Channel.WHATSAPP and hop.to in send.closed_sessions


def _hop_open(send: _Send, hop: Hop) -> bool:
    """Whether this hop may be tried at all: not suppressed, not a closed WhatsApp window."""
    return _hop_suppressed(send, hop) is None and not _hop_window_closed(send, hop)


def _hop_short_of_time(send: _Send, hop: Hop, now: datetime) -> str | None:
    """Why this hop's provider cannot take the message in time (its shortest validity is more than
    the time left), or None."""
    validity = provider_class(hop.provider).validity_seconds  # the class's: no adapter is built for it
    left = send.message.expires_at - now
    if validity is None or left >= timedelta(seconds=validity[0]):
        return None
    return validity_too_short(hop.provider, validity[0], left)


def _circuit_permits(sends: list[_Send]) -> None:
    """A circuit permit for each send (None: its circuit is open).

    A closed circuit grants every caller and writes nothing (providers.circuit), so one permit
    asked in the closed state stands for the whole round; open or half-open, each message asks
    for itself (trials are capped and go to the lowest priority first).
    """
    closed: dict[tuple[str, str], Any] = {}
    for send in sends:
        key = (send.hop.provider, send.message.priority)
        if key in closed:
            send.permit = closed[key]
            continue
        send.permit = circuit_breaker(send.hop.provider).allow(priority=send.message.priority)
        if send.permit is not None and not send.permit.trial:
            closed[key] = send.permit


async def _call_all(calling: list[_Send], budget_s: float) -> None:
    """The round's calls, BULK_SEND_CONCURRENCY at a time, all ended within budget_s from now:
    a round of many waves against a slow provider must still end inside the lease."""
    limit = asyncio.Semaphore(providers_setting("BULK_SEND_CONCURRENCY"))
    deadline = asyncio.get_running_loop().time() + budget_s
    await asyncio.gather(*(_call(send, limit, deadline) for send in calling))


async def _call(send: _Send, limit: asyncio.Semaphore, deadline: float) -> None:
    """One provider call on the send loop: no database and no Redis here."""
    send.result = send.error = send.bug = None
    send.sent = False
    hop = send.hop
    async with limit:
        send.started = time.monotonic()
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            # Its turn came after the round's time was up (earlier waves were slow): nothing left
            # here, so it moves on like any transient error, and tells the circuit nothing.
            send.error = TransientProviderError(
                "not sent: the batch's round ran out of time", error_type=ErrorType.PROVIDER_TIMEOUT
            )
            send.ended = time.monotonic()
            return
        send.sent = True
        try:
            send.result = await asyncio.wait_for(
                get_provider(hop.provider).send_async(send_request(send.message, hop)), remaining
            )
        except DeadlineTooShortError as exc:
            # prepare() found less time left than the provider's shortest validity (the round
            # waited for its turn since the hop was checked): not sent, the circuit told nothing.
            send.error = exc
            send.sent = False
        except TimeoutError:
            # A provider timeout bounds each socket operation, not the call: this bounds the call,
            # so a round always ends inside the lease (another worker may claim it after that).
            send.error = AmbiguousProviderError(
                f"no answer within {remaining:.0f}s", error_type=ErrorType.PROVIDER_TIMEOUT
            )
        except SEND_ERRORS as exc:
            send.error = exc
        except Exception as exc:  # a bug in an adapter: kept for _record, so it hits one message, not the batch
            send.bug = exc
        send.ended = time.monotonic()


def _breakers_record(calling: list[_Send]) -> None:
    """Each call's outcome to its provider's circuit, a round trip per provider."""
    by_provider: dict[str, list[tuple[Any, bool, float]]] = {}
    for send in calling:
        # A bug says nothing about the provider, nor does a call never made; their permits time out.
        if send.bug is None and send.sent:
            outcome = (send.permit, _breaker_failure(send.error), send.ended - send.started)
            by_provider.setdefault(send.hop.provider, []).append(outcome)
    for provider, outcomes in by_provider.items():
        circuit_breaker(provider).record_many(outcomes)


def _record(calling: list[_Send], released: set[Any]) -> None:
    """What the round's calls came to: every acceptance in a few statements, the rest one by one
    (they are the exceptions in a healthy campaign)."""
    accepted = [s for s in calling if s.result is not None]
    _record_accepted(accepted)
    released.update(send.message.pk for send in accepted)
    for send in calling:
        if send.result is not None:
            continue
        if send.bug is not None:
            # Left as a message whose task raised is left: accepted, the attempt in progress (its
            # outcome is unknown), looked up at the provider by its next claim.
            logger.error("message %s: the provider adapter raised", send.message.pk, exc_info=send.bug)
            send.settled = True
            continue
        assert send.error is not None and send.attempt is not None
        if isinstance(send.error, PermanentProviderError) and send.error.error_type in ADDRESS_REFUSALS:
            if _address_refused(send):
                send.settled = True
                released.add(send.message.pk)
            continue
        next_error = _settle_error(
            message=send.message,
            hop=send.hop,
            attempt=send.attempt,
            started=send.started,
            error=send.error,
            ended=send.ended,
        )
        if next_error is None:
            send.settled = True
            released.add(send.message.pk)
        else:
            send.last_error = next_error
            send.left_for = next_error.error_type
            send.index += 1


def _address_refused(send: _Send) -> bool:
    """The provider refused the address itself: the attempt, a suppression of the address for the
    client (reason provider_reported; one that cannot receive covers the exempt categories too),
    and the message leaves that address, unless it is of an exempt category and the address can
    receive: no other provider of the channel is asked for it. Another channel's hop may still go;
    with none left the message fails with the provider's error.
    Returns True when that settled the message."""
    message, hop, error = send.message, send.hop, send.error
    assert isinstance(error, PermanentProviderError) and send.attempt is not None
    attempt_finish_failed(
        attempt=send.attempt,
        started=send.started,
        ended=send.ended,
        outcome=AttemptOutcome.PERMANENT_ERROR,
        **error_fields(error),
    )
    client = ApiClient.objects.only("id", "name", "opt_out_exempt_categories").get(pk=message.client_id)
    covers_exempt = ADDRESS_REFUSALS[error.error_type]
    suppression_add(
        client=client,
        channel=hop.channel,
        address=hop.to,
        reason=SuppressionReason.PROVIDER_REPORTED,
        source=f"{hop.provider} {error.code}".strip(),
        note=str(error)[:500],
        covers_exempt=covers_exempt,
    )
    # An opt-out leaves the recipient's exempt categories (a code they asked for) to the other
    # providers of the channel, as the suppression it added does; an address that cannot receive
    # is left by everything.
    if covers_exempt or message.category not in exempt_categories(client.opt_out_exempt_categories):
        send.refused[(hop.channel, suppression_address(hop.channel, hop.to))] = error
    send.index += 1
    if any(_hop_open(send, later) for later in send.hops[send.index :]):
        send.last_error = error
        send.left_for = error.error_type
        return False
    message_record_failed(message=message, error=error)
    return True


def _record_accepted(accepted: list[_Send]) -> None:
    if not accepted:
        return
    wall_now, mono_now = timezone.now(), time.monotonic()
    attempts: dict[Any, dict[str, Any]] = {}
    for send in accepted:
        assert send.attempt is not None and send.result is not None
        attempts[send.attempt.pk] = {
            "outcome": AttemptOutcome.ACCEPTED,
            "ended_at": wall_now - timedelta(seconds=mono_now - send.ended),
            "latency_ms": int((send.ended - send.started) * 1000),
            "provider_message_id": send.result.provider_message_id,
        }
    references = {
        send.message.pk: {
            "provider": send.hop.provider,
            "provider_message_id": send.result.provider_message_id,
            "needs_provider_lookup": False,
        }
        for send in accepted
    }
    # One transaction: a worker killed between the two writes left an accepted attempt on a message
    # still `accepted`, which the next claim sent again (it looks up only unknown outcomes). The
    # messages first, as every writer of many locks them before their attempts.
    with transaction.atomic():
        applied = messages_transition(
            to_state=MessageState.DISPATCHED,
            source=EventSource.WORKER,
            changes={
                send.message.pk: (
                    accepted_detail(send.hop.provider, send.result),
                    {**RELEASE, **references[send.message.pk]},
                )
                for send in accepted
            },
        )
        rows_update(DispatchAttempt.objects.all(), attempts)
    for send in accepted:
        assert send.attempt is not None
        fields = attempts[send.attempt.pk]
        attempt_report(
            attempt=send.attempt, outcome=AttemptOutcome.ACCEPTED, latency_ms=fields["latency_ms"], fields=fields
        )
        if send.message.pk not in applied:
            message_record_dispatched_after_receipt(message=send.message, reference=references[send.message.pk])
        send.settled = True


def _hop_note(send: _Send) -> str:
    """Why this hop is tried, for its attempt row."""
    if send.index and send.left_for:
        return f"fallback after {send.hops[send.index - 1].provider} ({send.left_for})"
    if send.index == 0 and send.moved_ahead_of:
        return f"first choice, ahead of {send.moved_ahead_of} (routing conditions and weights)"
    return "first choice"


def _route_spent(send: _Send) -> None:
    """No hop left this round: a message whose every hop is suppressed fails for good (`suppressed`,
    never handed to a provider), as does one whose every hop is suppressed or a free-form WhatsApp
    hop with its window closed (`outside_session_window`, when the first such hop is one); one whose
    every other hop's provider needs more time than it has left expires (waiting gives it less); the
    others wait for their retry (_route_failed)."""
    message, now = send.message, timezone.now()
    open_hops = [hop for hop in send.hops if _hop_open(send, hop)]
    in_time = [hop for hop in open_hops if _hop_short_of_time(send, hop, now) is None]
    if in_time:
        _route_failed(message=message, hops=in_time, last_error=send.last_error, tried=send.tried)
        return
    if open_hops:
        reason = _hop_short_of_time(send, open_hops[0], now)
        message_record_expired(message=message, error=DeadlineTooShortError(reason or "no time left"))
        logger.info("message %s: no provider of its route can take it in the time left; expired", message.pk)
        return
    first = _first_blocker(send)
    closed = next((hop for hop in send.hops if _hop_window_closed(send, hop)), None)
    if closed is not None and (first is None or send.hops.index(closed) < send.hops.index(first[0])):
        message_record_failed(message=message, error=_outside_window_error(closed))
        logger.info("message %s: free-form WhatsApp outside the session window; failed, not sent", message.pk)
        return
    if first is None:  # refused by a provider in this claim, nothing else: _address_refused settles those
        assert send.last_error is not None
        message_record_failed(message=message, error=send.last_error)
        return
    hop, blocker = first
    error = PermanentProviderError(blocker.describe(hop.channel), error_type=ErrorType.SUPPRESSED)
    message_record_failed(message=message, error=error)
    logger.info("message %s: every hop's address is suppressed; failed, not sent", message.pk)


def _outside_window_error(hop: Hop) -> PermanentProviderError:
    window = whatsapp_session_window()
    hours = f"{window.total_seconds() / 3600:g}" if window is not None else "24"
    return PermanentProviderError(
        "a free-form WhatsApp message outside the session window (the recipient has not "
        f"written in the last {hours} hours): send a template or wait for the recipient to write",
        error_type=ErrorType.OUTSIDE_SESSION_WINDOW,
    )


def _first_blocker(send: _Send) -> tuple[Hop, Blocker] | None:
    """The first hop kept from the message by the list, and the suppression (its error names it)."""
    message = send.message
    for hop in send.hops:
        blocker = send.suppressions.blocking(
            client_id=message.client_id, channel=hop.channel, address=hop.to, category=message.category
        )
        if blocker is not None:
            return hop, blocker
    return None


def _route_failed(*, message: Message, hops: list[Hop], last_error: ProviderError | None, tried: bool) -> None:
    """Every hop was unavailable: wait and try again (or dead-letter when the budget is spent)."""
    assert last_error is not None
    if tried:
        message_schedule_retry(message=message, error=last_error, ambiguous=False)
        return
    # Every circuit open: no point asking before the first one lets a trial through; the jitter
    # keeps a whole backlog from arriving at that moment together.
    reopen_s = min(seconds_until_half_open(hop.provider) for hop in hops)
    message_schedule_retry(
        message=message, error=last_error, ambiguous=False, counted=False, at_least_s=reopen_s + random.uniform(0, 1)
    )


def _breaker_failure(exc: ProviderError | None) -> bool:
    """Whether an outcome counts against the provider's health (one bad number does not)."""
    return isinstance(exc, (TransientProviderError, AmbiguousProviderError))


def _settle_error(
    *,
    message: Message,
    hop: Hop,
    attempt: DispatchAttempt,
    started: float,
    error: ProviderError,
    ended: float | None = None,
) -> TransientProviderError | None:
    """Record a failed provider call (its circuit already told). Returns the transient error to
    move on to the next hop with, or None when the message is settled for now."""
    finished = {"attempt": attempt, "started": started, "ended": ended, **error_fields(error)}
    if isinstance(error, TransientProviderError):
        attempt_finish_failed(outcome=AttemptOutcome.TRANSIENT_ERROR, **finished)
        if error.retry_after:
            rate_limiter(hop.provider).penalize(error.retry_after)  # slow it down for every worker
        return error
    if isinstance(error, AmbiguousProviderError):
        # The flag before the attempt leaves "in progress": a worker killed between the two writes
        # must leave one of them saying "look it up", or the next claim sends it again.
        Message.objects.filter(pk=message.pk).update(needs_provider_lookup=True)
        message.needs_provider_lookup = True
        attempt_finish_failed(outcome=AttemptOutcome.AMBIGUOUS, **finished)
        message_schedule_retry(message=message, error=error, ambiguous=True)  # stays with this provider until looked up
        return None
    attempt_finish_failed(outcome=AttemptOutcome.PERMANENT_ERROR, **finished)
    message_record_failed(message=message, error=error)
    return None
