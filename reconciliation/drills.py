"""Fallback drills (`manage.py drill`, issue 24): take one provider out of live traffic for a few
minutes, watch the traffic move to the route's next provider, put it back, and store a report of
what moved where, the latency before, during and after, and whether anything was lost or doubled.

Plain functions, in the order the command calls them: drill_plan (what would happen, with the
reasons to refuse), drill_run (force, watch, restore: always, even on Ctrl-C), drill_report (the
arithmetic, from PostgreSQL alone, so it can be recomputed for any stored windows).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.models import AttemptOutcome, DispatchAttempt, Message, ProviderRoute, RouteCondition
from messaging.route_health import RouteState, provider_route_set, recipient_country, route_state
from messaging.states import DEAD_LETTER_STATES, MessageState
from providers.circuit import CLOSED
from providers.guards import circuit_breaker
from providers.types import ErrorType
from reconciliation.models import Drill, DrillStatus

logger = logging.getLogger(__name__)

CIRCUIT_OPEN = "circuit_open"
DEGRADED = "degraded"
MODES = (CIRCUIT_OPEN, DEGRADED)

# A drill shorter than this moves too few messages to say anything; longer than this is an
# outage, not a drill.
MIN_DURATION_SECONDS = 10
MAX_DURATION_SECONDS = 1800
DEFAULT_DURATION_SECONDS = 180
# After restoring, traffic is watched this long: messages accepted during the drill finish their
# retries, and the traffic is seen coming back.
DEFAULT_SETTLE_SECONDS = 60
# The forced open outlives the planned drill by this much (the restore clears it at once); a
# drill whose process died leaves it for no longer than this after its planned end.
FORCE_MARGIN_SECONDS = 30
# A drill row still `running` this long past its planned end (duration + settle) belongs to a
# dead process: it is closed as aborted (and its route restored) by the next drill.
STALE_GRACE_SECONDS = 120
# How often progress is reported while it runs.
PROGRESS_EVERY_SECONDS = 5.0
# The share of the drilled channels' sends the drilled provider may still take during the drill:
# none with its circuit forced open (only calls already in flight when it opened), a probing
# share when degraded (dispatch keeps probing a degraded provider with a little real traffic).
MAX_DRILLED_SHARE = {CIRCUIT_OPEN: 0.02, DEGRADED: 0.2}
# With its circuit forced open, a send to the drilled provider this soon after the force is a
# round that had its permit before (dispatch asks once per round): in flight, not a failed move.
IN_FLIGHT_SECONDS = 2.0
# Given up on for the recipient's own reasons (a bad number, an opt-out): no drill loses those.
RECIPIENT_ERRORS = frozenset(
    {
        ErrorType.INVALID_RECIPIENT,
        ErrorType.REJECTED,
        ErrorType.OPTED_OUT,
        ErrorType.SUPPRESSED,
        ErrorType.OUTSIDE_SESSION_WINDOW,
    }
)
# Listed in the report (the counts are always complete).
LIST_AT_MOST = 20
UNHEALTHY_CONDITIONS = (RouteCondition.DEGRADED, RouteCondition.DRAINED)


class DrillRefused(Exception):
    """Why the drill will not run (the command prints it and exits non-zero)."""


@dataclass
class DrillPlan:
    provider: str
    country: str
    mode: str
    duration_seconds: int
    settle_seconds: int
    # Channel -> the other providers of its route, and the healthy ones among them.
    alternatives: dict[str, list[str]] = field(default_factory=dict)
    healthy: dict[str, list[str]] = field(default_factory=dict)
    # Why each unhealthy alternative is not healthy, e.g. {"vonage": "circuit open"}.
    unhealthy: dict[str, str] = field(default_factory=dict)
    refusals: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def channels(self) -> list[str]:
        """The channels the report watches: those with another provider to move to."""
        return sorted(channel for channel, others in self.alternatives.items() if others)

    def describe(self) -> list[str]:
        where = f" for {self.country}" if self.country else ""
        how = "force its circuit breaker open" if self.mode == CIRCUIT_OPEN else "mark its route degraded"
        lines = [
            f"Drill on {self.provider}{where}: {how} for {self.duration_seconds}s, restore it, "
            f"then watch {self.settle_seconds}s more."
        ]
        for channel in sorted(self.alternatives):
            others = self.alternatives[channel]
            if not others:
                lines.append(f"  {channel}: no other provider in its route (its messages wait; not watched)")
                continue
            states = ", ".join(
                f"{p} ({'healthy' if p in self.healthy[channel] else self.unhealthy.get(p, 'unhealthy')})"
                for p in others
            )
            lines.append(f"  {channel}: falls back to {states}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return lines


def _provider_health(provider: str, country: str) -> str:
    """'' when healthy, else why not: its circuit is not closed, or its route is degraded/drained."""
    state = circuit_breaker(provider).state()
    if state != CLOSED:
        return f"circuit {state.replace('_', '-')}"
    # From the table, not dispatch's per-process cache: an operator's change a second ago counts.
    routes = {
        (r.provider, r.country): RouteState(r.provider, r.country, r.condition, r.weight)
        for r in ProviderRoute.objects.filter(provider=provider, country__in={country, ""})
    }
    route = route_state(provider, country, routes)
    if route is not None and route.condition in UNHEALTHY_CONDITIONS:
        return f"route {route.condition}"
    return ""


def drill_plan(
    *,
    provider: str,
    country: str = "",
    mode: str = CIRCUIT_OPEN,
    duration_seconds: int = DEFAULT_DURATION_SECONDS,
    settle_seconds: int = DEFAULT_SETTLE_SECONDS,
) -> DrillPlan:
    """What a drill would do, with its refusals (empty: it may run). Changes nothing except closing
    drills left running by a dead process."""
    country = country.upper()
    plan = DrillPlan(provider, country, mode, duration_seconds, settle_seconds)
    if mode not in MODES:
        plan.refusals.append(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == CIRCUIT_OPEN and country:
        plan.refusals.append("a circuit breaker is per provider, not per country: use --mode degraded with --country")
    if not MIN_DURATION_SECONDS <= duration_seconds <= MAX_DURATION_SECONDS:
        plan.refusals.append(f"the duration must be between {MIN_DURATION_SECONDS}s and {MAX_DURATION_SECONDS}s")
    if settle_seconds < 0:
        plan.refusals.append("the settle period cannot be negative")
    routes: dict[str, list[str]] = messaging_setting("ROUTES")
    for channel, providers in routes.items():
        if provider in providers:
            plan.alternatives[channel] = [p for p in providers if p != provider]
    if not plan.alternatives:
        plan.refusals.append(f"{provider} is in no route (ROUTES: {routes})")
    health = {p: _provider_health(p, country) for others in plan.alternatives.values() for p in others}
    plan.unhealthy = {p: why for p, why in health.items() if why}
    for channel, others in plan.alternatives.items():
        plan.healthy[channel] = [p for p in others if not health[p]]
        if not others:
            plan.warnings.append(f"{channel} has no other provider: its messages wait for the drill to end")
        elif not plan.healthy[channel]:
            unhealthy = ", ".join(f"{p} ({health[p]})" for p in others)
            plan.refusals.append(f"no healthy fallback for {channel}: {unhealthy}")
    if plan.alternatives and not plan.channels:
        plan.refusals.append(f"no route of {provider} has another provider to fall back to")
    drills_close_stale()
    running = Drill.objects.filter(status=DrillStatus.RUNNING).first()
    if running is not None:
        plan.refusals.append(
            f"drill {running.pk} on {running.provider} is running (started {running.started_at:%H:%M:%S})"
        )
    return plan


def drills_close_stale(*, now: datetime | None = None) -> list[Drill]:
    """Close drills left running by a dead process (past their planned end and a grace) as aborted,
    restoring a route a degraded drill left behind. The forced circuit expires by itself."""
    now = now or timezone.now()
    closed = []
    for drill in Drill.objects.filter(status=DrillStatus.RUNNING):
        settle = int(drill.report.get("settle_seconds", DEFAULT_SETTLE_SECONDS))
        if drill.started_at + timedelta(seconds=drill.duration_seconds + settle + STALE_GRACE_SECONDS) > now:
            continue
        restored = _restore(drill)
        drill.status = DrillStatus.ABORTED
        drill.ended_at = now
        drill.summary = "Aborted: its process died before the drill ended; the provider was restored."
        drill.report = {**drill.report, "restored": restored, "aborted": "process died"}
        drill.save(update_fields=["status", "ended_at", "summary", "report"])
        logger.warning("drill %s on %s was left running by a dead process: closed as aborted", drill.pk, drill.provider)
        closed.append(drill)
    return closed


def _begin(plan: DrillPlan, started_by: str) -> Drill:
    """The drill's row, created only while no other drill runs (an advisory lock serialises starts)."""
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(hashtext('conductor.drill'))")
        running = Drill.objects.filter(status=DrillStatus.RUNNING).first()
        if running is not None:
            raise DrillRefused(f"drill {running.pk} on {running.provider} is running")
        previous = ProviderRoute.objects.filter(provider=plan.provider, country=plan.country).first()
        return Drill.objects.create(
            provider=plan.provider,
            country=plan.country,
            mode=plan.mode,
            started_by=started_by,
            started_at=timezone.now(),
            duration_seconds=plan.duration_seconds,
            report={
                "settle_seconds": plan.settle_seconds,
                "channels": plan.channels,
                "fallbacks": plan.healthy,
                "previous_condition": previous.condition if previous else RouteCondition.HEALTHY,
            },
        )


def _force(drill: Drill) -> None:
    if drill.mode == CIRCUIT_OPEN:
        circuit_breaker(drill.provider).force_open(
            seconds=drill.duration_seconds + FORCE_MARGIN_SECONDS, reason=f"drill:{drill.pk}"
        )
    else:
        provider_route_set(
            provider=drill.provider,
            country=drill.country,
            condition=RouteCondition.DEGRADED,
            reason=f"fallback drill {drill.pk} for {drill.duration_seconds}s",
            source=f"drill:{drill.pk}",
        )


def _restore(drill: Drill) -> bool:
    """Put the provider back as it was; True when it is back (nothing of the drill's is left)."""
    if drill.mode == CIRCUIT_OPEN:
        breaker = circuit_breaker(drill.provider)
        if breaker.snapshot().get("forced_reason") in ("", f"drill:{drill.pk}"):
            breaker.clear_forced()
        return not breaker.snapshot().get("forced", False)
    route = ProviderRoute.objects.filter(provider=drill.provider, country=drill.country).first()
    if route is not None and route.source == f"drill:{drill.pk}":
        # Only the drill's own change is undone: a later change (the detector, an operator) stands.
        provider_route_set(
            provider=drill.provider,
            country=drill.country,
            condition=drill.report.get("previous_condition", RouteCondition.HEALTHY),
            reason=f"fallback drill {drill.pk} ended",
            source=f"drill:{drill.pk}",
        )
    return True


def drill_watch(drill: Drill, *, since: datetime) -> Counter:
    """Sends accepted by each provider since `since` in the drill's channels (progress lines)."""
    attempts = DispatchAttempt.objects.filter(
        outcome=AttemptOutcome.ACCEPTED, started_at__gte=since, message__channel__in=drill.report["channels"]
    )
    if drill.country:
        rows = attempts.values_list("provider", "message__channel", "message__to")
        return Counter(p for p, channel, to in rows if recipient_country(channel, to) == drill.country)
    return Counter(attempts.values_list("provider", flat=True))


def drill_run(
    plan: DrillPlan,
    *,
    started_by: str,
    progress: Callable[[str], None] = lambda line: None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Drill:
    """Run a planned drill: force, watch, restore (always), settle, report. Ctrl-C (or any error)
    restores the provider at once; an interrupted drill is stored as aborted, with its report."""
    if plan.refusals:
        raise DrillRefused("; ".join(plan.refusals))
    drill = _begin(plan, started_by)
    aborted = ""
    try:
        _force(drill)
        # The drill's windows start when the provider went out, not when its row was written.
        drill.started_at = timezone.now()
        drill.save(update_fields=["started_at"])
        progress(f"drill {drill.pk}: {drill.provider} taken out ({drill.mode}) for {drill.duration_seconds}s")
        _wait(drill, drill.started_at, drill.duration_seconds, "during", progress, sleep, clock)
    except KeyboardInterrupt:
        aborted = "interrupted"
    except BaseException:
        _finish(drill, restored=_restore(drill), aborted="error", restored_at=timezone.now())
        raise
    restored = _restore(drill)
    restored_at = timezone.now()
    progress(f"drill {drill.pk}: {drill.provider} restored" if restored else f"{drill.provider} NOT restored")
    if not aborted:
        try:
            _wait(drill, restored_at, plan.settle_seconds, "after", progress, sleep, clock)
        except KeyboardInterrupt:
            aborted = "interrupted while settling"
    return _finish(drill, restored=restored, aborted=aborted, restored_at=restored_at)


def _wait(drill, since, seconds, phase, progress, sleep, clock) -> None:
    end = clock() + seconds
    while (left := end - clock()) > 0:
        sleep(min(PROGRESS_EVERY_SECONDS, left))
        counts = drill_watch(drill, since=since)
        sent = ", ".join(f"{p} {n}" for p, n in counts.most_common()) or "nothing sent"
        progress(f"  {phase} {seconds - max(0.0, end - clock()):.0f}/{seconds}s: {sent}")


def _finish(drill: Drill, *, restored: bool, aborted: str, restored_at: datetime) -> Drill:
    report = drill_report(
        provider=drill.provider,
        country=drill.country,
        mode=drill.mode,
        channels=drill.report["channels"],
        started_at=drill.started_at,
        restored_at=restored_at,
        ends_at=timezone.now(),
        restored=restored,
    )
    drill.report = {**drill.report, **report}
    if aborted:
        drill.report["aborted"] = aborted
        drill.status = DrillStatus.ABORTED
    else:
        drill.status = report["status"]
    drill.summary = drill_summary(drill)
    drill.ended_at = timezone.now()
    drill.save(update_fields=["report", "status", "summary", "ended_at"])
    logger.warning("drill %s on %s: %s", drill.pk, drill.provider, drill.summary)
    return drill


def _percentiles(seconds: list[float]) -> dict[str, Any]:
    """Nearest-rank p50 and p95 in seconds (None without samples)."""
    values = sorted(seconds)

    def rank(q: float) -> float | None:
        if not values:
            return None
        return round(values[max(0, math.ceil(q * len(values)) - 1)], 3)

    return {"count": len(values), "p50": rank(0.5), "p95": rank(0.95)}


def drill_report(
    *,
    provider: str,
    country: str,
    mode: str,
    channels: list[str],
    started_at: datetime,
    restored_at: datetime,
    ends_at: datetime,
    restored: bool = True,
) -> dict[str, Any]:
    """The drill's report from PostgreSQL: for the windows before (as long as the drill, ending at
    its start), during (start to restore) and after (restore to `ends_at`):

    - moved: sends accepted by each provider (attempt start in the window), the drilled channels only;
    - latency: accepted→dispatched and dispatched→delivered p50/p95 of the messages accepted in it;
    - affected: messages a fallback provider took during the drill (in_flight_at_start: sends to
      the drilled provider in its first IN_FLIGHT_SECONDS, let through before the force);
    - lost: messages accepted during the drill that, by `ends_at`, were neither sent nor waiting for
      a scheduled retry, or were given up on for a reason other than the recipient's own;
    - doubled: messages a provider accepted more than once in one send generation.
    """
    windows = {
        "before": (started_at - (restored_at - started_at), started_at),
        "during": (started_at, restored_at),
        "after": (restored_at, ends_at),
    }

    def window_of(moment: datetime | None) -> str | None:
        if moment is None:
            return None
        return next((name for name, (start, end) in windows.items() if start <= moment < end), None)

    def in_scope(channel: str, to: str) -> bool:
        return not country or recipient_country(channel, to) == country

    first, last = windows["before"][0], windows["after"][1]
    attempts = DispatchAttempt.objects.filter(
        outcome=AttemptOutcome.ACCEPTED, started_at__gte=first, started_at__lt=last, message__channel__in=channels
    ).values_list("message_id", "send_generation", "provider", "started_at", "message__channel", "message__to")
    moved: dict[str, Counter] = {name: Counter() for name in windows}
    affected: set = set()
    accepted_sends: Counter = Counter()
    in_flight, in_flight_grace = 0, timedelta(seconds=IN_FLIGHT_SECONDS)
    for message_id, generation, sent_by, started, channel, to in attempts.iterator():
        if not in_scope(channel, to):
            continue
        accepted_sends[(message_id, generation)] += 1
        name = window_of(started)
        if name is None:
            continue
        moved[name][sent_by] += 1
        if name == "during" and sent_by != provider:
            affected.add(message_id)
        elif name == "during" and mode == CIRCUIT_OPEN and started < started_at + in_flight_grace:
            in_flight += 1

    messages = Message.objects.filter(accepted_at__gte=first, accepted_at__lt=last, channel__in=channels).values_list(
        "id",
        "channel",
        "to",
        "state",
        "accepted_at",
        "dispatched_at",
        "delivered_at",
        "next_attempt_at",
        "last_error_type",
    )
    latency: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in windows}
    accepted_in: Counter = Counter()
    lost: list[str] = []
    waiting = refused = 0
    for message_id, channel, to, state, accepted, dispatched, delivered, next_attempt, error in messages.iterator():
        if not in_scope(channel, to):
            continue
        name = window_of(accepted)
        accepted_in[name] += 1
        if dispatched is not None:
            latency[name]["accepted_to_dispatched"].append((dispatched - accepted).total_seconds())
            if delivered is not None:
                latency[name]["dispatched_to_delivered"].append((delivered - dispatched).total_seconds())
        if name != "during" or dispatched is not None:
            continue
        if state == MessageState.ACCEPTED:
            if next_attempt is not None and next_attempt > ends_at:
                waiting += 1  # its next retry is due later: late, not lost
            else:
                lost.append(str(message_id))
        elif state in DEAD_LETTER_STATES:
            if error in RECIPIENT_ERRORS:
                refused += 1
            else:
                lost.append(str(message_id))

    doubled = sorted({str(message_id) for (message_id, _), n in accepted_sends.items() if n > 1})
    during_total = sum(moved["during"].values())
    drilled_share = (moved["during"][provider] - in_flight) / during_total if during_total else None
    checks = {
        "traffic": during_total > 0,
        "moved": drilled_share is not None and drilled_share <= MAX_DRILLED_SHARE.get(mode, 0.0),
        "nothing_lost": not lost,
        "nothing_doubled": not doubled,
        "restored": restored,
    }
    return {
        "windows": {
            name: {"start": start.isoformat(), "end": end.isoformat()} for name, (start, end) in windows.items()
        },
        "moved": {name: dict(counts.most_common()) for name, counts in moved.items()},
        "accepted": {name: accepted_in[name] for name in windows},
        "drilled_share_during": round(drilled_share, 4) if drilled_share is not None else None,
        "in_flight_at_start": in_flight,
        "latency": {
            name: {
                kind: _percentiles(latency[name][kind])
                for kind in ("accepted_to_dispatched", "dispatched_to_delivered")
            }
            for name in windows
        },
        "affected": len(affected),
        "lost": len(lost),
        "lost_ids": lost[:LIST_AT_MOST],
        "waiting_for_retry": waiting,
        "refused_for_recipient": refused,
        "doubled": len(doubled),
        "doubled_ids": doubled[:LIST_AT_MOST],
        "restored": restored,
        "checks": checks,
        "status": DrillStatus.PASSED if all(checks.values()) else DrillStatus.FAILED,
    }


def drill_summary(drill: Drill) -> str:
    """One paragraph for the admin, the dashboard's tooltip and the command's last lines."""
    r = drill.report
    moved = r.get("moved", {})

    def sends(name: str) -> str:
        return ", ".join(f"{p} {n}" for p, n in moved.get(name, {}).items()) or "none"

    def p95(name: str) -> str:
        value = r.get("latency", {}).get(name, {}).get("accepted_to_dispatched", {}).get("p95")
        return "-" if value is None else f"{value:.2f}s"

    failed = [name.replace("_", " ") for name, ok in r.get("checks", {}).items() if not ok]
    verdict = str(drill.status).upper() + (f" ({', '.join(failed)} failed)" if failed else "")
    aborted = f" Aborted: {r['aborted']}." if r.get("aborted") else ""
    return (
        f"{verdict}.{aborted} Drill on {drill.provider}{' (' + drill.country + ')' if drill.country else ''} "
        f"({drill.mode}, {drill.duration_seconds}s). Sends before: {sends('before')}; during: {sends('during')}; "
        f"after: {sends('after')}. Messages affected: {r.get('affected', 0)}, lost: {r.get('lost', 0)}, "
        f"doubled: {r.get('doubled', 0)}. Accepted→dispatched p95 before/during/after: "
        f"{p95('before')}/{p95('during')}/{p95('after')}. Provider restored: {'yes' if r.get('restored') else 'NO'}."
    )


def last_drill() -> dict[str, Any] | None:
    """The latest finished or running drill, for the dashboard."""
    drill = Drill.objects.order_by("-started_at").first()
    if drill is None:
        return None
    return {
        "id": drill.pk,
        "provider": drill.provider,
        "country": drill.country,
        "mode": drill.mode,
        "status": drill.status,
        "started_at": drill.started_at.isoformat(),
        "summary": drill.summary,
    }
