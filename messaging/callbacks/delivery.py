"""Delivering status callbacks: claim what is due, post it, record the answers, in batches.

The task (`messaging.deliver_callbacks`, queue `callbacks`) runs one deliverer for up to
BUDGET_S: a loop in the task's thread that does the database work, with the HTTP on the
process's sender loop (messaging.callbacks.sender), so requests stay in flight while it writes.

- Claim (one statement, `_CLAIM_SQL`): due pending callbacks whose lease is free and that are
  the head of their (message, endpoint) sequence (no earlier one pending: per message, callbacks
  go in order), at most the endpoint's free slots each (CALLBACK_CONCURRENCY_PER_ENDPOINT minus
  what this deliverer has in flight there) and the deliverer's free slots in all
  (CALLBACK_CONCURRENCY), oldest due first, locked FOR UPDATE SKIP LOCKED and leased
  (CALLBACK_LEASE_SECONDS). It reads endpoint by endpoint (callback_pending_by_endpoint), and
  endpoints at their limit or held back by an open circuit are left out before their rows are
  read, so a slow or dead endpoint's backlog costs the others nothing.
- Circuit (one per endpoint, providers.circuit in Redis): asked once per endpoint per claim (a
  closed-state permit covers the calls of the next PERMIT_REUSE_S); open: the claimed callbacks
  go back unattempted, due when it half-opens, and the endpoint is left out of claims until then
  (messaging.callbacks.trigger's paused set, shared by every deliverer).
- Record (one statement per batch, `_RECORD_SQL`, every GATHER_S or so): each answer's outcome,
  the attempt appended to attempt_log in the same UPDATE; delivered, or the next attempt time
  (messaging.callbacks.retries), or given up: parked as a dead letter (callbacks_park).
- A deliverer killed mid-request leaves leased rows: claimed again when the lease runs out, and
  posted again with the same webhook-id (at least once; receivers de-duplicate on it).
- Idle (nothing due within LINGER_S): it clears the running flag, looks once more (a kick that
  came in between found the flag set and published nothing) and ends.
"""

from __future__ import annotations

import json
import logging
import queue
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from messaging.callbacks.dead_letters import callbacks_park
from messaging.callbacks.retries import DELIVERED, FINAL, RETRY, Verdict, classify, next_attempt_at
from messaging.callbacks.retries import retry_after_seconds as parse_retry_after
from messaging.callbacks.sender import CallbackRequest, CallbackResponse, callback_sender
from messaging.callbacks.trigger import (
    FLAG_REFRESH_S,
    callbacks_due_within,
    deliverer_clear_running,
    deliverer_mark_running,
    deliverer_publish_next,
    endpoints_pause,
    endpoints_paused,
)
from messaging.conf import messaging_setting
from messaging.metrics import callback_attempt_observe, callback_delivered_observe, callbacks_held_observe
from messaging.models import Callback, CallbackEndpoint, CallbackState
from providers.circuit import OPEN, CircuitBreaker, CircuitSettings, Permit

logger = logging.getLogger(__name__)

# A task hands over to a fresh one after this long: well inside the broker's visibility timeout
# (a task held past it is delivered again), and a worker restart waits for at most this.
BUDGET_S = 60.0
# Answers gathered this long after the first before they are written together: a few writes a
# second per deliverer at any rate, and a callback's successor (same message) waits this little.
GATHER_S = 0.01
# ...and only for requests sent less than this long ago: a hanging endpoint's stay in flight until
# the timeout, and waiting for them made every batch of a healthy endpoint's wait the whole GATHER_S
# (its p99 +60 % beside a dead endpoint, in bench/callback_delivery.py --dead-endpoint hold).
GATHER_FRESH_S = 0.25
# With nothing claimable, look again this often (new rows come with a kick, retries come due).
POLL_S = 0.1
# Stay (and keep the flag) while a callback comes due within this long: a retry a few seconds
# off is sent on time rather than at the sweeper's next tick.
LINGER_S = 5.0
# A closed circuit's permit covers an endpoint's calls this long: one Redis call per endpoint per
# second rather than one per callback. Another deliverer that opens it in between costs at most
# this second of calls to a failing endpoint.
PERMIT_REUSE_S = 1.0
# An endpoint's answers are told its circuit together, this often at most.
CIRCUIT_TELL_S = 0.25
# A half-open circuit lets a few trial calls through; the endpoint's other claimed callbacks go
# back and it is not claimed from again for this long.
TRIAL_PAUSE_S = 1.0
PRIORITY = "transactional"  # the circuit's half-open trials are shared by priority; ours is one
# The endpoint's circuit: the providers' window, with a slow call being a timeout (below). It opens
# only for an endpoint failing 9 calls in 10: one failing less is flaky, not dead, and is served by
# retries with backoff (at 50 %, an endpoint answering 40 % of calls with errors kept its circuit
# open and got almost nothing: 3 half-open trials all succeed 22 % of the time). A slow endpoint
# costs other endpoints nothing either way: CALLBACK_CONCURRENCY_PER_ENDPOINT caps what it holds.
CIRCUIT_WINDOW_SIZE = 20
CIRCUIT_MINIMUM_CALLS = 10
CIRCUIT_FAILURE_RATE = 0.9
# A dead client endpoint is tried again every half a minute (3 trial callbacks each time).
CIRCUIT_OPEN_SECONDS = 30.0


@dataclass
class Claimed:
    id: int
    endpoint_id: int
    url: str
    secrets: list[dict[str, Any]]
    enabled: bool
    failing_since: datetime | None
    webhook_id: str
    body: bytes
    attempts: int
    created_at: datetime
    occurred_at: datetime
    permit: Permit | None = None
    sent_at: float = 0.0  # monotonic, when its request was handed to the sender


@dataclass
class DeliveryReport:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    held: int = 0  # claimed while the endpoint's circuit was open: back, unattempted
    outcomes: Counter = field(default_factory=Counter)


@cache
def endpoint_circuit_settings(timeout_s: float) -> CircuitSettings:
    return CircuitSettings(
        window_size=CIRCUIT_WINDOW_SIZE,
        minimum_calls=CIRCUIT_MINIMUM_CALLS,
        failure_rate_threshold=CIRCUIT_FAILURE_RATE,
        # An answer as slow as the timeout is an endpoint in trouble even when it came.
        slow_call_seconds=timeout_s,
        open_seconds=CIRCUIT_OPEN_SECONDS,
        # One trial answered 2xx closes it: the endpoint is reachable again, and the failure rate
        # over the window decides from there. Three in a row (the providers' default) kept a
        # reachable endpoint failing 40 % of calls out for minutes after an outage (0.6^3 = 22 %
        # a round, 30 s a round).
        half_open_successes_to_close=1,
        # A trial not recorded within the lease belongs to a deliverer that died.
        trial_timeout_seconds=max(timeout_s * 2, 10.0),
    )


def endpoint_circuit(endpoint_id: int, timeout_s: float | None = None) -> CircuitBreaker:
    """The endpoint's circuit breaker (its state is in Redis, shared by every deliverer)."""
    timeout_s = messaging_setting("CALLBACK_TIMEOUT_SECONDS") if timeout_s is None else timeout_s
    return CircuitBreaker(f"callback:{endpoint_id}", endpoint_circuit_settings(float(timeout_s)))


def callbacks_deliver(*, budget_s: float = BUDGET_S) -> DeliveryReport:
    """The task's work: deliver due callbacks until none is due soon, or the budget is spent
    (then a fresh task takes over)."""
    return _Deliverer().run(budget_s)


# Due, unleased heads of their (message, endpoint) sequence, at endpoints not left out: each
# endpoint with pending callbacks is found by a loose scan of callback_pending_by_endpoint (one
# probe per endpoint, however long its backlog), its free slots' worth of oldest due heads read
# from the same index; of those, the oldest due first, up to `limit`, locked (SKIP LOCKED:
# deliverers never wait for each other) and leased. An endpoint left out (at its limit, circuit
# open) costs the probe, not a read of its backlog: with one range over every endpoint's due rows,
# each claim read a dead endpoint's whole backlog beside a healthy one's few rows. The picked ids
# are then looked up by key (= ANY(ARRAY(...)): a join would let the planner read the whole table).
# "Not delivered or dead-lettered" rather than "pending" where a row is found by its key (its
# earlier pending callback, the picked ids): the same rows, but no partial index on pending rows
# can serve it, so a new table's missing statistics cannot send those look-ups through one (seen:
# every earlier-callback probe read the endpoint's whole backlog, 17 ms a claim of 16 on 6,000).
_CLAIM_SQL = """
WITH RECURSIVE busy(endpoint_id, n) AS (
    SELECT * FROM unnest(%(busy_ids)s::bigint[], %(busy_counts)s::int[])
),
endpoints(endpoint_id) AS (
    SELECT min(c.endpoint_id) FROM {callback} c WHERE c.state = 'pending'
    UNION ALL
    SELECT (SELECT min(c.endpoint_id) FROM {callback} c WHERE c.state = 'pending' AND c.endpoint_id > e.endpoint_id)
    FROM endpoints e WHERE e.endpoint_id IS NOT NULL
),
heads AS (
    SELECT h.id, h.next_attempt_at
    FROM endpoints e
    LEFT JOIN busy b ON b.endpoint_id = e.endpoint_id
    CROSS JOIN LATERAL (
        SELECT c.id, c.next_attempt_at FROM {callback} c
        WHERE c.endpoint_id = e.endpoint_id AND c.state = 'pending' AND c.next_attempt_at <= %(now)s
          AND (c.lease_expires_at IS NULL OR c.lease_expires_at < %(now)s)
          AND NOT EXISTS (
              SELECT 1 FROM {callback} p
              WHERE p.message_id = c.message_id AND p.endpoint_id = c.endpoint_id
                AND p.sequence < c.sequence AND p.state NOT IN ('delivered', 'dead_lettered')
          )
        ORDER BY c.next_attempt_at
        LIMIT GREATEST(%(per_endpoint)s - COALESCE(b.n, 0), 0)
    ) h
    WHERE e.endpoint_id IS NOT NULL AND NOT (e.endpoint_id = ANY(%(left_out)s::bigint[]))
),
picked AS (
    SELECT c.id FROM {callback} c
    WHERE c.id = ANY(ARRAY(SELECT heads.id FROM heads ORDER BY heads.next_attempt_at LIMIT %(limit)s))
      AND c.state NOT IN ('delivered', 'dead_lettered') AND (c.lease_expires_at IS NULL OR c.lease_expires_at < %(now)s)
    FOR UPDATE SKIP LOCKED
)
UPDATE {callback} c SET lease_expires_at = %(lease)s
FROM picked, {endpoint} ep
WHERE c.id = picked.id AND ep.id = c.endpoint_id
RETURNING c.id, c.endpoint_id, ep.url, ep.secrets, ep.enabled, ep.failing_since, c.webhook_id, c.payload,
          c.attempts, c.created_at, c.occurred_at
"""

# Each answer's outcome, its attempt appended to the log in the same statement. A callback
# another deliverer finished meanwhile (its lease ran out under us) is left as that one wrote it.
_RECORD_SQL = """
UPDATE {callback} c SET
    state = v.state,
    attempts = c.attempts + 1,
    attempt_log = c.attempt_log || jsonb_build_array(v.entry),
    next_attempt_at = COALESCE(v.next_attempt_at, c.next_attempt_at),
    lease_expires_at = NULL,
    delivered_at = v.delivered_at,
    last_error = v.last_error
FROM jsonb_to_recordset(%s::jsonb)
    AS v(id bigint, state varchar, entry jsonb, next_attempt_at timestamptz, delivered_at timestamptz,
         last_error varchar)
WHERE c.id = v.id AND c.state = 'pending'
"""

# failing_since per endpoint: `reset` when the batch had a success (then `since` is the first
# failure after the last success, or null), else the earliest failure unless one is known already.
_FAILING_SQL = """
UPDATE {endpoint} ep SET failing_since = CASE WHEN v.reset THEN v.since ELSE COALESCE(ep.failing_since, v.since) END
FROM jsonb_to_recordset(%s::jsonb) AS v(id bigint, reset boolean, since timestamptz)
WHERE ep.id = v.id
"""


def _sql(template: str) -> str:
    return template.format(callback=Callback._meta.db_table, endpoint=CallbackEndpoint._meta.db_table)


class _Deliverer:
    def __init__(self) -> None:
        self.timeout_s = float(messaging_setting("CALLBACK_TIMEOUT_SECONDS"))
        self.concurrency = int(messaging_setting("CALLBACK_CONCURRENCY"))
        self.per_endpoint = int(messaging_setting("CALLBACK_CONCURRENCY_PER_ENDPOINT"))
        self.lease_s = float(messaging_setting("CALLBACK_LEASE_SECONDS"))
        self.base_s = float(messaging_setting("CALLBACK_BACKOFF_BASE_SECONDS"))
        self.max_s = float(messaging_setting("CALLBACK_BACKOFF_MAX_SECONDS"))
        self.window_s = float(messaging_setting("CALLBACK_RETRY_WINDOW_SECONDS"))
        self.sender = callback_sender(self.concurrency)
        self.answers: queue.SimpleQueue[CallbackResponse] = queue.SimpleQueue()
        self.in_flight: dict[int, Claimed] = {}  # sent or answered, not yet recorded
        self.busy: Counter[int] = Counter()  # in_flight per endpoint
        self.failing: dict[int, datetime | None] = {}  # failing_since as last read or written
        self.permits: dict[int, tuple[Permit, float]] = {}  # closed-state permits, with when
        self.paused: dict[int, float] = {}  # endpoint -> monotonic time it may be claimed again
        self.breakers: dict[int, CircuitBreaker] = {}
        self.circuit_told_at: dict[int, float] = {}  # endpoint -> when its answers were last told its circuit
        self.untold: dict[int, list[tuple[Permit, bool, float]]] = {}  # answers not yet told
        self.secrets: dict[str, list[dict[str, Any]]] = {}
        self.report = DeliveryReport()

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, budget_s: float) -> DeliveryReport:
        deliverer_mark_running()
        began = flagged = time.monotonic()
        next_claim = began
        idle_since: float | None = None
        while True:
            now = time.monotonic()
            if now - flagged >= FLAG_REFRESH_S:
                deliverer_mark_running()
                flagged = now
            stopping = now - began >= budget_s
            # In flight: wait for answers (each frees a slot). Else: until the next look.
            answers = self._gather(POLL_S if self.in_flight else max(0.0, next_claim - now))
            if answers:
                self._record(answers)
                next_claim = time.monotonic()  # slots freed, successors unblocked
            if not stopping and len(self.in_flight) < self.concurrency and time.monotonic() >= next_claim:
                claimed = self._claim_and_send()
                next_claim = time.monotonic() + (0 if claimed else POLL_S)
                if claimed:
                    idle_since = None
            if self.in_flight:
                continue
            if stopping:
                if self._due_within(0.0):
                    deliverer_publish_next()
                else:
                    deliverer_clear_running()
                return self.report
            if idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= POLL_S * 3 and not self._due_within(LINGER_S):
                deliverer_clear_running()
                if self._claim_and_send():  # a kick after the last look found the flag still set
                    deliverer_mark_running()
                    idle_since = None
                    continue
                return self.report

    def _gather(self, wait_s: float) -> list[CallbackResponse]:
        """The answers in: waits up to `wait_s` for one, takes every one already there, then waits
        up to GATHER_S for those of the other requests sent recently (fewer, larger writes)."""
        try:
            answers = [self.answers.get(timeout=wait_s) if wait_s > 0 else self.answers.get_nowait()]
        except queue.Empty:
            return []
        while len(answers) < len(self.in_flight):  # a loop short of CPU finds many waiting
            try:
                answers.append(self.answers.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        deadline = now + GATHER_S
        expected = sum(1 for c in self.in_flight.values() if now - c.sent_at < GATHER_FRESH_S)
        while len(answers) < expected:
            remaining = deadline - time.monotonic()
            try:
                answers.append(self.answers.get(timeout=remaining) if remaining > 0 else self.answers.get_nowait())
            except queue.Empty:
                break
        return answers

    # --- claiming ---------------------------------------------------------------------------------
    def _left_out(self) -> list[int]:
        """Endpoints not to claim from now: at their limit here, or held back (open circuit)."""
        now = time.monotonic()
        self.paused = {endpoint: until for endpoint, until in self.paused.items() if until > now}
        full = [endpoint for endpoint, n in self.busy.items() if n >= self.per_endpoint]
        return sorted({*full, *self.paused, *endpoints_paused()})

    def _claim(self) -> list[Claimed]:
        free = self.concurrency - len(self.in_flight)
        if free <= 0:
            return []
        now = timezone.now()
        busy = {endpoint: n for endpoint, n in self.busy.items() if n}
        params = {
            "now": now,
            "lease": now + timedelta(seconds=self.lease_s),
            "left_out": self._left_out(),
            "busy_ids": list(busy),
            "busy_counts": list(busy.values()),
            "per_endpoint": self.per_endpoint,
            "limit": free,
        }
        with connection.cursor() as cursor:
            cursor.execute(_sql(_CLAIM_SQL), params)
            rows = cursor.fetchall()
        claimed = [self._claimed(row) for row in rows]
        claimed.sort(key=lambda c: c.id)
        self.report.claimed += len(claimed)
        return claimed

    def _claimed(self, row: tuple) -> Claimed:
        (pk, endpoint_id, url, secrets, enabled, failing_since, webhook_id, payload, attempts, created, occurred) = row
        self.failing[endpoint_id] = failing_since
        parsed = self.secrets.get(secrets)
        if parsed is None:
            if len(self.secrets) > 1000:
                self.secrets.clear()
            parsed = self.secrets[secrets] = json.loads(secrets) if isinstance(secrets, str) else secrets
        if isinstance(payload, str):
            payload = json.loads(payload)
        return Claimed(
            id=pk,
            endpoint_id=endpoint_id,
            url=url,
            secrets=parsed,
            enabled=enabled,
            failing_since=failing_since,
            webhook_id=webhook_id,
            body=json.dumps(payload, separators=(",", ":")).encode(),
            attempts=attempts,
            created_at=created,
            occurred_at=occurred,
        )

    def _claim_and_send(self) -> int:
        claimed = self._claim()
        if not claimed:
            return 0
        again = [c.id for c in claimed if c.id in self.in_flight]
        if again:
            # Its lease ran out while our request was still out (a loop starved of CPU for longer
            # than the lease): the claim renewed the lease, the answer still to come records it.
            logger.warning("callbacks %s claimed again while in flight: lease too short for this load", again[:10])
            claimed = [c for c in claimed if c.id not in self.in_flight]
        sendable = self._settle_unsendable(claimed)
        to_send = self._admit(sendable)
        sent_at = time.monotonic()
        for callback in to_send:
            callback.sent_at = sent_at
            self.in_flight[callback.id] = callback
            self.busy[callback.endpoint_id] += 1
        self.sender.submit(
            [CallbackRequest(c.id, c.url, c.webhook_id, c.body, c.secrets) for c in to_send],
            timeout_s=self.timeout_s,
            answer=self.answers.put,
        )
        return len(claimed)

    def _settle_unsendable(self, claimed: list[Claimed]) -> list[Claimed]:
        """Park what can never be sent: an endpoint disabled since the row was written (its
        pending callbacks are parked by the disabling, this is a race's leftover) or one with no
        secret to sign with."""
        now = timezone.now()
        disabled = [c.id for c in claimed if not c.enabled]
        unsigned = [c.id for c in claimed if c.enabled and not c.secrets]
        if disabled:
            self.report.dead_lettered += callbacks_park(callback_ids=disabled, reason="endpoint_disabled", now=now)
        if unsigned:
            self.report.dead_lettered += callbacks_park(
                callback_ids=unsigned, reason="endpoint has no signing secret", now=now
            )
        return [c for c in claimed if c.enabled and c.secrets]

    def _admit(self, claimed: list[Claimed]) -> list[Claimed]:
        """Ask each endpoint's circuit; return what may be sent, each with its permit, and put
        back the rest (not an attempt: attempts and the log are left alone)."""
        by_endpoint: dict[int, list[Claimed]] = defaultdict(list)
        for callback in claimed:
            by_endpoint[callback.endpoint_id].append(callback)
        send: list[Claimed] = []
        back: dict[datetime, list[int]] = defaultdict(list)
        pauses: dict[int, float] = {}
        now = time.time()
        for endpoint_id, callbacks in by_endpoint.items():
            permit = self._permit(endpoint_id)
            if permit is None:
                reopens = self._reopens_at(endpoint_id, now)
                pauses[endpoint_id] = reopens
                self.paused[endpoint_id] = time.monotonic() + (reopens - now)
                back[datetime.fromtimestamp(reopens, tz=UTC)].extend(c.id for c in callbacks)
                callbacks_held_observe(len(callbacks))
                self.report.held += len(callbacks)
                continue
            if permit.trial:  # one call finds out whether the endpoint is back
                callbacks, rest = callbacks[:1], callbacks[1:]
                if rest:
                    self.paused[endpoint_id] = time.monotonic() + TRIAL_PAUSE_S
                    back[timezone.now()].extend(c.id for c in rest)
            for callback in callbacks:
                callback.permit = permit
            send.extend(callbacks)
        for due_at, ids in back.items():
            Callback.objects.filter(pk__any=ids, state=CallbackState.PENDING).update(
                next_attempt_at=due_at, lease_expires_at=None
            )
        endpoints_pause(pauses)
        return send

    def _breaker(self, endpoint_id: int) -> CircuitBreaker:
        breaker = self.breakers.get(endpoint_id)
        if breaker is None:
            breaker = self.breakers[endpoint_id] = endpoint_circuit(endpoint_id, self.timeout_s)
        return breaker

    def _permit(self, endpoint_id: int) -> Permit | None:
        cached = self.permits.get(endpoint_id)
        if cached is not None and time.monotonic() - cached[1] < PERMIT_REUSE_S:
            return cached[0]
        permit = self._breaker(endpoint_id).allow(priority=PRIORITY)
        if permit is not None and not permit.trial:
            self.permits[endpoint_id] = (permit, time.monotonic())
        else:
            self.permits.pop(endpoint_id, None)
        return permit

    def _reopens_at(self, endpoint_id: int, now: float) -> float:
        """When an endpoint whose circuit said no may be tried: when it half-opens, or (half-open,
        its trials taken) shortly."""
        snapshot = self._breaker(endpoint_id).snapshot(now)
        opened_at = snapshot.get("opened_at")
        if snapshot.get("state") == OPEN and opened_at:
            return max(now + TRIAL_PAUSE_S, opened_at + self._breaker(endpoint_id).settings.open_seconds)
        return now + TRIAL_PAUSE_S

    # --- recording --------------------------------------------------------------------------------
    def _record(self, answers: list[CallbackResponse]) -> None:
        now = timezone.now()
        rows: list[dict[str, Any]] = []
        give_up: dict[str, list[int]] = defaultdict(list)
        circuit: dict[int, list[tuple[Permit, bool, float]]] = defaultdict(list)
        by_endpoint: dict[int, list[tuple[datetime, bool]]] = defaultdict(list)
        for answer in answers:
            callback = self.in_flight.pop(answer.key, None)
            if callback is None:  # cannot happen: one answer per request, one request per claim
                logger.error("callback %s: an answer for a request not in flight, ignored", answer.key)
                continue
            self.busy[callback.endpoint_id] -= 1
            verdict = classify(status=answer.status, error=answer.error)
            error = _error_text(answer, verdict)
            entry = {
                "at": answer.started_at.isoformat(),
                "status": answer.status,
                "error": error,
                "latency_ms": round(answer.latency_s * 1000),
            }
            row = {"id": callback.id, "state": CallbackState.PENDING, "entry": entry, "next_attempt_at": None}
            row |= {"delivered_at": None, "last_error": error[:500]}
            outcome = verdict.outcome
            if outcome == DELIVERED:
                row["state"], row["delivered_at"] = CallbackState.DELIVERED, now.isoformat()
                callback_delivered_observe(occurred_at=callback.occurred_at, at=now)
                self.report.delivered += 1
            elif outcome == RETRY:
                at = next_attempt_at(
                    attempts=callback.attempts + 1,
                    created_at=callback.created_at,
                    now=now,
                    retry_after=parse_retry_after(answer.retry_after, now=now) if answer.status in (429, 503) else None,
                    base=self.base_s,
                    maximum=self.max_s,
                    window=self.window_s,
                )
                if at is None:
                    outcome = FINAL
                    give_up[f"retry window spent (last: {verdict.reason})"].append(callback.id)
                else:
                    row["next_attempt_at"] = at.isoformat()
                    self.report.retried += 1
            else:
                give_up[f"final answer: HTTP {answer.status}"].append(callback.id)
            callback_attempt_observe(outcome=outcome, reason=verdict.reason, latency_s=answer.latency_s)
            self.report.outcomes[outcome] += 1
            rows.append(row)
            if callback.permit is not None:
                circuit[callback.endpoint_id].append((callback.permit, verdict.endpoint_failing, answer.latency_s))
            by_endpoint[callback.endpoint_id].append((answer.started_at, outcome == DELIVERED))
        failing = self._failing_changes(by_endpoint)
        # One statement in autocommit while all goes well; with callbacks given up on, their
        # attempts and their parking commit together.
        with transaction.atomic() if give_up else nullcontext():
            with connection.cursor() as cursor:
                cursor.execute(_sql(_RECORD_SQL), [json.dumps(rows)])
                if failing:
                    cursor.execute(_sql(_FAILING_SQL), [json.dumps(failing)])
            for reason, ids in give_up.items():
                self.report.dead_lettered += callbacks_park(callback_ids=ids, reason=reason, now=now)
        self._record_circuits(circuit)

    def _failing_changes(self, by_endpoint: dict[int, list[tuple[datetime, bool]]]) -> list[dict[str, Any]]:
        """endpoint.failing_since: set at the first failure after a success, cleared by a success.
        Only endpoints whose value changes are written (none while all goes well)."""
        changes = []
        for endpoint_id, results in by_endpoint.items():
            results.sort()
            known = self.failing.get(endpoint_id)
            reset = any(ok for _, ok in results)
            since = None if reset else known
            for at, ok in results:
                since = None if ok else (since or at)
            if since == known:
                continue
            self.failing[endpoint_id] = since
            changes.append({"id": endpoint_id, "reset": reset, "since": since.isoformat() if since else None})
        return changes

    def _record_circuits(self, circuit: dict[int, list[tuple[Permit, bool, float]]]) -> None:
        """The answers to each endpoint's circuit (one script run each); an endpoint
        whose circuit opened is held back from now on."""
        pauses: dict[int, float] = {}
        now = time.time()
        for endpoint_id, answered in circuit.items():
            # Told in bulk, at most every CIRCUIT_TELL_S per endpoint (a trial's answer at once):
            # one Redis script run per endpoint and period however many answers. Every answer is
            # told, successes and failures alike: telling only some successes would make a flaky
            # endpoint look dead to the circuit.
            untold = self.untold.setdefault(endpoint_id, [])
            untold.extend(answered)
            trial = any(permit.trial for permit, _, _ in answered)
            if not trial and now - self.circuit_told_at.get(endpoint_id, 0.0) < CIRCUIT_TELL_S:
                continue
            outcomes = untold[-CIRCUIT_WINDOW_SIZE:]
            self.untold[endpoint_id] = []
            failures = any(failed for _, failed, _ in outcomes)
            self.circuit_told_at[endpoint_id] = now
            breaker = self._breaker(endpoint_id)
            breaker.record_many(outcomes)
            if any(permit.trial and not failed for permit, failed, _ in outcomes):
                self.paused.pop(endpoint_id, None)  # the next trial (or all, once it closed) now
            if failures and breaker.state() == OPEN:
                self.permits.pop(endpoint_id, None)
                reopens = self._reopens_at(endpoint_id, now)
                pauses[endpoint_id] = reopens
                self.paused[endpoint_id] = time.monotonic() + (reopens - now)
        if pauses:
            logger.info("callback endpoints %s: circuit open, held back", sorted(pauses))
        endpoints_pause(pauses)

    def _due_within(self, seconds: float) -> bool:
        """Whether a callback this deliverer could claim comes due within `seconds` (at an
        endpoint not held back, or held back for less than that)."""
        until = time.monotonic() + seconds
        left_out = sorted(endpoint for endpoint, paused_until in self.paused.items() if paused_until > until)
        return callbacks_due_within(now=timezone.now(), seconds=seconds, left_out=left_out)


def _error_text(answer: CallbackResponse, verdict: Verdict) -> str:
    if verdict.outcome == DELIVERED:
        return ""
    if answer.status is None:
        return answer.detail or verdict.reason
    return f"HTTP {answer.status}"
