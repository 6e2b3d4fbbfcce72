"""The bulk send path: a batch of messages claimed, sent concurrently and recorded in a few statements.

A campaign is bounded by what each message costs us, not by the provider: one Celery task and a
dozen database round trips per message cap a worker far below what the provider takes. Here one
task carries up to BULK_BATCH_SIZE ids; the batch is claimed with one lease, its attempt rows and
its dispatched transitions are written a statement per batch, and a round's provider calls all
run at once on the process's send loop (asyncio; the adapter's async client over pooled
keep-alive connections, or its blocking client in the loop's thread pool). The loop only makes
provider calls; every database and Redis call happens on the task's own thread, between rounds.

The guarantees are the single path's (messaging.dispatch), on which this one is built:
- the lease keeps other workers off a claimed message, and an attempt row is written before each
  call, so a worker killed mid-batch leaves in-progress attempts that the next claim looks up
  at the provider before any resend;
- a message that needs more than a plain send (a lost attempt, an unknown outcome to look up, an
  ordering key, a passed deadline, a provider with a rate limit) is handed back to the
  per-message task, which settles it;
- the route is walked hop by hop for the whole batch: an open circuit or a transient error moves
  a message to its next hop, an ambiguous one stays put, a permanent one fails it; a message whose
  route is spent waits for its retry (full-jitter backoff) exactly as in the single path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.dispatch import (
    SEND_ERRORS,
    breaker_failure,
    hop_note,
    hop_skipped,
    route_failed,
    settle_error,
)
from messaging.lookup import send_request
from messaging.models import AttemptOutcome, DispatchAttempt, ErrorType, EventSource, Message
from messaging.outcomes import (
    RELEASE,
    accepted_after_receipt,
    accepted_detail,
    attempt_report,
)
from messaging.publish import message_publish
from messaging.routing import Hop, message_route
from messaging.rows import rows_insert, rows_update, rows_update_in_key_order
from messaging.services import messages_transition
from messaging.states import MessageState
from providers.conf import providers_setting
from providers.guards import circuit_breaker, rate_limiter
from providers.registry import get_provider
from providers.types import AmbiguousProviderError, ProviderError, SendResult, TransientProviderError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Send:
    """One message's way through its route within a batch."""

    message: Message
    hops: list[Hop]
    index: int = 0  # the hop being tried
    last_error: ProviderError | None = None
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


def messages_dispatch_batch(*, message_ids: list[str]) -> int:
    """Send a batch of bulk messages; ids already claimed, sent or moved on are skipped.

    Returns how many messages this call claimed.
    """
    lease, claimed, sends, first_round = _claim(message_ids)
    released: set[Any] = set()  # messages whose lease a final write has already given up
    try:
        if sends:
            _walk(sends, lease, first_round, released)
    finally:
        # Normally released by each message's final write; this covers an exception on the way
        # and the rarer endings (a healthy batch has nothing left here: no statement).
        left = [send.message.pk for send in sends if send.message.pk not in released]
        if left:
            rows_update_in_key_order(
                Message.objects.filter(pk__any=left, lease_expires_at=lease), lease_expires_at=None
            )
    return len(claimed)


def _claim(message_ids: list[str]) -> tuple[datetime, list[Message], list[_Send], list[_Send]]:
    """Lock the batch's rows (one order for every claimer), keep the claimable ones, lease them,
    and start the first round: its attempt rows and counters go in with the lease, one
    transaction and one write of each row for what used to be three (bench/README.md, profiles).

    Returns the lease, the claimed messages, the plain sends among them and the first round's
    calls. Only primary keys reach the SQL: a predicate on state lets PostgreSQL pick the state
    index, which it believes selective until statistics catch up with a campaign that has just
    added 200,000 accepted rows, and then each claim scans all of them (117 ms measured, for
    100 rows). The checks run here instead, on locked rows, so nothing can change them in
    between. The lease value names this claim; a few random microseconds keep it unique.
    """
    now = timezone.now()
    lease = now + timedelta(
        seconds=messaging_setting("DISPATCH_LEASE_SECONDS"), microseconds=random.randrange(1, 1_000_000)
    )
    with transaction.atomic():
        rows = list(
            Message.objects.select_for_update()
            .filter(pk__any=message_ids)
            .order_by("pk")
            .only(*_SEND_FIELDS, "state", "lease_expires_at", "next_attempt_at")
        )
        claimed = [message for message in rows if message.is_claimable(now)]
        if not claimed:
            return lease, [], [], []
        sends, handed_back = _sort_out(claimed, now)
        first_round = _round_start(sends)
        rows_update(
            Message.objects.all(),
            {
                s.message.pk: {
                    "lease_expires_at": lease,
                    "enqueued_at": None,
                    "attempt_count": s.message.attempt_count,  # the rows are locked: the values stand
                    "provider": s.message.provider,
                }
                for s in sends
            },
        )
        if handed_back:  # never leased: published again once this commits
            Message.objects.filter(pk__any=[m.pk for m in handed_back]).update(enqueued_at=timezone.now())
    for message in handed_back:
        message_publish(message_id=message.pk, channel=message.channel, priority=message.priority)
    return lease, claimed, sends, first_round


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
)


def _sort_out(messages: list[Message], now: datetime) -> tuple[list[_Send], list[Message]]:
    """The plain sends of the batch, and the rest, for the per-message path, which settles them."""
    lost = set(
        DispatchAttempt.objects.filter(
            message_id__any=[m.pk for m in messages], outcome=AttemptOutcome.IN_PROGRESS
        ).values_list("message_id", flat=True)
    )
    sends, handed_back = [], []
    for message in messages:
        hops = message_route(
            channel=message.channel,
            to=message.to,
            fallback_channels=message.fallback_channels,
            fallback_to=message.fallback_to,
        )
        special = (
            message.pk in lost  # its worker died mid-call: look it up first
            or message.needs_provider_lookup
            or message.sequence is not None  # may have to wait for an earlier one with its key
            or message.expires_at <= now
            or not hops
            or _rate_limited(hops[0].provider)
        )
        (handed_back if special else sends).append(message if special else _Send(message, hops))
    return sends, handed_back


def _rate_limited(provider: str) -> bool:
    """A provider with a rate limit takes sends one slot at a time: a round of them at once would
    arrive bunched whenever this process is short of CPU. The per-message path waits for each
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


def _walk(sends: list[_Send], lease: datetime, first_round: list[_Send], released: set[Any]) -> None:
    """Round by round, every message of the batch tries its next hop, as messaging.dispatch._walk
    does for one message; a round's calls run at once. The first round was started by the claim."""
    loop = _send_loop()
    lease_s = messaging_setting("DISPATCH_LEASE_SECONDS")
    active, calling = sends, first_round
    while True:
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
            # timeouts, a round takes at most one): let the per-message path finish these.
            logger.warning("bulk batch: %d message(s) handed back, the lease is running out", len(active))
            _hand_back([s.message for s in active], lease)
            released.update(s.message.pk for s in active)
            return
        for send in active:
            if send.index >= len(send.hops):
                route_failed(send.message, send.hops, send.last_error, tried=send.tried)
                send.settled = True
        active = [s for s in active if not s.settled]
        if not active:
            return
        throttled = [s for s in active if _rate_limited(s.hop.provider)]
        if throttled:
            _hand_back([s.message for s in throttled], lease)
            for send in throttled:
                send.settled = True
                released.add(send.message.pk)
            active = [s for s in active if not s.settled]
        calling = _round_start(active)
        _counters_write(calling)


def _round_start(active: list[_Send]) -> list[_Send]:
    """A round's permits and its in-progress attempt rows, before any call: a worker killed
    mid-call leaves them behind, and the next claim looks those messages up before sending again.
    A hop whose circuit is open is recorded as skipped; the message moves on to its next hop.
    Returns the round's calls; their messages' counters are counted up in memory only."""
    _gate(active)
    calling = []
    for send in active:
        if send.permit is None:
            send.last_error = hop_skipped(send.message, send.hop)
            send.index += 1
        else:
            send.tried = True
            calling.append(send)
    if not calling:
        return calling
    now = timezone.now()
    for send in calling:
        send.message.attempt_count += 1
        send.message.provider = send.hop.provider  # the provider to ask if this call's outcome is lost
        send.attempt = DispatchAttempt(
            message=send.message,
            number=send.message.attempt_count,
            send_generation=send.message.send_generation,
            provider=send.hop.provider,
            channel=send.hop.channel,
            note=hop_note(send.hops, send.index, send.last_error)[:200],
            started_at=now,
            outcome=AttemptOutcome.IN_PROGRESS,
        )
    rows_insert(DispatchAttempt, [send.attempt for send in calling], new_keys=True)
    return calling


def _gate(sends: list[_Send]) -> None:
    """A circuit permit for each send, as the single path asks.

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
            outcome = (send.permit, breaker_failure(send.error), send.ended - send.started)
            by_provider.setdefault(send.hop.provider, []).append(outcome)
    for provider, outcomes in by_provider.items():
        circuit_breaker(provider).record_many(outcomes)


def _counters_write(calling: list[_Send]) -> None:
    """The attempt counters and providers of a round after the first (the claim writes the first's)."""
    by_provider: dict[str, list[Any]] = {}
    for send in calling:
        by_provider.setdefault(send.hop.provider, []).append(send.message.pk)
    for provider, ids in by_provider.items():
        rows_update_in_key_order(
            Message.objects.filter(pk__any=ids), attempt_count=F("attempt_count") + 1, provider=provider
        )


def _record(calling: list[_Send], released: set[Any]) -> None:
    """What the round's calls came to: every acceptance in a few statements, the rest one by one
    through the single path's own settling (they are the exceptions in a healthy campaign)."""
    accepted = [s for s in calling if s.result is not None]
    _record_accepted(accepted)
    released.update(send.message.pk for send in accepted)
    for send in calling:
        if send.result is not None:
            continue
        if send.bug is not None:
            # Left as the single path leaves a message whose task raised: accepted, the attempt in
            # progress (its outcome is unknown), looked up at the provider by its next claim.
            logger.error("message %s: bulk send raised", send.message.pk, exc_info=send.bug)
            send.settled = True
            continue
        assert send.error is not None and send.attempt is not None
        next_error = settle_error(send.message, send.hop, send.attempt, send.started, send.error, send.ended)
        if next_error is None:
            send.settled = True
        else:
            send.last_error = next_error
            send.index += 1


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
    rows_update(DispatchAttempt.objects.all(), attempts)
    references = {
        send.message.pk: {
            "provider": send.hop.provider,
            "provider_message_id": send.result.provider_message_id,
            "needs_provider_lookup": False,
        }
        for send in accepted
    }
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
    for send in accepted:
        assert send.attempt is not None
        fields = attempts[send.attempt.pk]
        attempt_report(send.attempt, AttemptOutcome.ACCEPTED, fields["latency_ms"], fields)
        if send.message.pk not in applied:
            accepted_after_receipt(send.message, references[send.message.pk])
        send.settled = True


class _SendLoop:
    """An event loop in a daemon thread: a round's provider calls all run on it at once, over the
    adapters' pooled keep-alive connections; a blocking adapter runs in its thread pool."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(providers_setting("BULK_SEND_CONCURRENCY"), "bulk-send")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.executor)
        threading.Thread(target=self.loop.run_forever, name="bulk-send-loop", daemon=True).start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


_loop: tuple[int, _SendLoop] | None = None


def _send_loop() -> _SendLoop:
    """One per process, made after the fork (a prefork child must not inherit its parent's)."""
    global _loop
    if _loop is None or _loop[0] != os.getpid():
        _loop = (os.getpid(), _SendLoop())
    return _loop[1]
