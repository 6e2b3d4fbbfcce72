"""Issue 24's done-when, live: a silent drop to one country moves that country's traffic, and only
it, to the next provider, and back once the drop stops.

On the real stack at production timings (bench/_support.py: settings.base, beat's anomaly detection
every 60 s, one-minute buckets, a receipt counted within 120 s), in its own database (dropped and
created again):

 1. start the private Redis, the sandbox (Twilio and Vonage at 50 ms per send, each message
    delivered 200 ms after acceptance and called back as the provider does: docs/sandbox.md),
    gunicorn, the receipt intake, beat and the workers as the Procfile (urgent -c 2, maintenance
    -c 1, receipts -c 1); the SMS route is Twilio, then Vonage;
 2. backfill the detector's history: the two-hour baseline (and the hour window before it) is
    written as DeliveryBucket rows, per provider and destination country as buckets.py writes them,
    for the hours before the start, from a seeded Poisson series at the run's rate and country mix,
    every message receipted and delivered within the receipt maturity (what the sandbox does
    without faults; the live cohorts before the drop are printed beside it). Otherwise the detector
    judges nothing for two hours;
 3. post --rate transactional SMS a second through POST /api/v1/messages/ (open loop, one request
    each: a 2FA/notice stream), to US 50 %, GB 30 %, FR 20 % of them;
 4. after --steady minutes (T0), the sandbox drops --drop of Twilio's messages to +44 silently
    (fault `drop_rules`); record when a drop alert naming twilio and GB opens and when the route
    (twilio, GB) becomes degraded;
 5. --degraded minutes later (T1) the drop stops (`drop_rules` []); record when (twilio, GB) is
    healthy again, then watch --after minutes more;
 6. stop posting, let the last receipts come, and count, per minute of creation: GB messages via
    Vonage and delivered, via Twilio, and US/FR messages via Twilio.

Verdicts against the done-when: the alert within 10 min of T0; from the degradation to T1 at least
90 % of new GB messages through Vonage and delivered; US and FR on Twilio throughout (>= 99 %, no
route of theirs changed); the route healthy within 10 min of T1, and GB back on Twilio after it.

Run: .venv/bin/python bench/route_failover.py [--rate 20] [--drop 0.3] [--max-minutes 30] [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from _support import (
    MAINTENANCE_QUEUES,
    URGENT_QUEUES,
    Figure,
    fresh_database,
    print_figures,
    production_stack,
    start_queue_worker,
    stop_on_sigterm,
    stop_stack,
    write_json,
)

DATABASE = "conductor_bench_route_failover"
CATEGORY = "bench-failover"
# Destination mix; each country's numbers are valid ones phonenumbers places in it.
MIX = (("US", 0.5), ("GB", 0.3), ("FR", 0.2))
PREFIX = {"US": "+1", "GB": "+44", "FR": "+33"}
DROPPED_COUNTRY, DROPPED_PREFIX = "GB", "+44"
FIRST, NEXT = "twilio", "vonage"
LIMIT_S = 600  # the done-when's 10 minutes, both ways


def number(country: str, n: int) -> str:
    if country == "US":
        return f"+1415{2000000 + n % 8000000:07d}"
    if country == "GB":
        return f"+447400{n % 1000000:06d}"
    return f"+336{10000000 + n % 90000000:08d}"


@dataclass
class Options:
    rate: float = 20.0
    drop: float = 0.3
    steady_min: float = 2.0  # traffic before the drop
    degraded_min: float = 5.0  # traffic on the degraded route before the drop stops
    after_min: float = 2.0  # traffic after the route is healthy again
    max_minutes: float = 30.0  # the live phase at most (each wait gets what is left of it)
    priority: str = "transactional"
    backfill_min: int = 190  # the detector's lookback: 60 min window + 120 min baseline + margin
    seed: int = 24
    quick: bool = False
    database: str = DATABASE
    settle_s: float = 300.0  # a loaded machine's backlog must drain before the count


@dataclass
class Result:
    options: dict[str, Any]
    backfill: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0  # time.time() of the first POST
    t0: float = 0.0  # drop on
    alert_at: float | None = None  # first drop alert naming twilio and GB
    alert: str = ""
    degraded_at: float | None = None
    t1: float | None = None  # drop off
    healthy_at: float | None = None
    ended: float = 0.0  # last POST
    posted: int = 0
    post_errors: list[str] = field(default_factory=list)
    undispatched: int = 0  # still `accepted` after settling: left out of every share (routing is unknown)
    minutes: list[dict[str, Any]] = field(default_factory=list)
    windows: dict[str, dict[str, Any]] = field(default_factory=dict)
    alerts: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)
    pre_drop_rates: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0


# --- the stream -----------------------------------------------------------------------------------
class Stream(threading.Thread):
    """Posts a transactional SMS every 1/`rate` s until stopped (open loop, each from a pool thread),
    to a country drawn from MIX (seeded)."""

    def __init__(self, stack, key: str, rate: float, priority: str, seed: int):
        super().__init__(daemon=True, name="stream")
        self.stack, self.key, self.interval, self.priority = stack, key, 1.0 / rate, priority
        self.random = random.Random(seed)
        self.posted = 0
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.first = 0.0
        self.last = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()

    def _post(self, country: str, n: int) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = self.stack.api(self.key)
        payload = {
            "channel": "sms",
            "to": number(country, n),
            "body": f"Your code is {100000 + n % 900000}. It expires in 10 minutes.",
            "priority": self.priority,
            "category": CATEGORY,
        }
        try:
            response = session.post(f"{self.stack.web_url}/api/v1/messages/", json=payload, timeout=30)
            with self._lock:
                if response.status_code == 201:
                    self.posted += 1
                else:
                    self.errors.append(f"{response.status_code} {response.text[:200]}")
        except Exception as exc:  # noqa: BLE001 - counted and reported, the stream goes on
            with self._lock:
                self.errors.append(repr(exc))

    def run(self) -> None:
        countries, weights = zip(*MIX, strict=True)
        with ThreadPoolExecutor(16, thread_name_prefix="post") as pool:
            n, next_at = 0, time.monotonic()
            self.first = time.time()
            while not self.stopping.is_set():
                pool.submit(self._post, self.random.choices(countries, weights)[0], n)
                n += 1
                next_at += self.interval
                self.stopping.wait(max(0.0, next_at - time.monotonic()))
            self.last = time.time()


# --- the baseline ---------------------------------------------------------------------------------
def backfill(opts: Options, until: datetime) -> dict[str, Any]:
    """The detector's history before `until`: minute buckets of Twilio's SMS per destination country
    and provider-wide (""), as buckets_refresh writes them, from a seeded Poisson series at the run's
    rate and mix. Every message receipted and delivered within the maturity, as the sandbox delivers
    without faults (200 ms after acceptance). The provider-wide rows carry the provider calls too
    (attempts, no errors) but no latency: latency is not judged until live history has two hours."""
    import numpy as np

    from reconciliation.anomalies import floor_time
    from reconciliation.buckets import ALL_COUNTRIES
    from reconciliation.conf import detector_settings
    from reconciliation.models import DeliveryBucket

    settings = detector_settings()
    bucket = settings.bucket_seconds
    end = floor_time(until, bucket)
    rng = np.random.default_rng(opts.seed)
    now = datetime.now(UTC)  # updated_at: buckets_refresh recounts from here on only
    rows, totals = [], defaultdict(int)
    for index in range(opts.backfill_min * 60 // bucket):
        start = end - timedelta(seconds=(index + 1) * bucket)
        whole = 0
        for country, share in MIX:
            n = int(rng.poisson(opts.rate * share * bucket))
            whole += n
            totals[country] += n
            rows.append(_bucket_row(DeliveryBucket, country, start, n, now, bucket))
        rows.append(_bucket_row(DeliveryBucket, ALL_COUNTRIES, start, whole, now, bucket, attempts=whole))
    DeliveryBucket.objects.bulk_create(rows)
    return {
        "buckets": len(rows),
        "from": (end - timedelta(minutes=opts.backfill_min)).isoformat(),
        "until": end.isoformat(),
        "messages": dict(totals),
        "receipted_share": 1.0,
        "delivered_share": 1.0,
    }


def _bucket_row(model, country: str, start: datetime, n: int, now: datetime, seconds: int, attempts: int = 0):
    return model(
        channel="sms", provider=FIRST, country=country, seconds=seconds, start=start, updated_at=now,
        dispatched=n, receipted=n, delivered=n, undelivered=0, attempts=attempts,
    )  # fmt: skip


# --- watching -------------------------------------------------------------------------------------
def route_condition(country: str) -> str:
    from messaging.models import ProviderRoute

    row = ProviderRoute.objects.filter(provider=FIRST, country=country).first()
    return row.condition if row is not None else "healthy"


def dropped_alert():
    from reconciliation.anomalies import DROP_KINDS
    from reconciliation.models import Alert

    return (
        Alert.objects.filter(provider=FIRST, country=DROPPED_COUNTRY, kind__in=DROP_KINDS).order_by("opened_at").first()
    )


def stamp(moment: float, origin: float) -> str:
    return f"T0{'+' if moment >= origin else '-'}{abs(moment - origin) / 60:.1f} min"


class Watch:
    """The main loop's clock: waits and progress lines, within the live phase's budget."""

    def __init__(self, result: Result, stream: Stream, deadline: float):
        self.result, self.stream, self.deadline = result, stream, deadline
        self.next_line = time.time() + 60

    def left(self) -> float:
        return self.deadline - time.time()

    def until(self, predicate, seconds: float, what: str) -> float | None:
        """Poll `predicate` every 2 s for up to `seconds` (within the budget); time.time() when true."""
        began = time.time()
        stop = min(began + seconds, self.deadline)
        while True:
            if predicate():
                return time.time()
            self.progress()
            if time.time() >= stop:
                if what:
                    print(f"  ... {what}: not within {(time.time() - began) / 60:.1f} min", flush=True)
                return None
            if not self.stream.is_alive():
                raise RuntimeError("the stream stopped")
            time.sleep(2.0)

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.until(lambda: False, seconds, "")

    def progress(self) -> None:
        if time.time() < self.next_line:
            return
        self.next_line += 60
        when = stamp(time.time(), self.result.t0) if self.result.t0 else "before T0"
        print(
            f"  {when}: {self.stream.posted:,} posted, (twilio, GB) {route_condition(DROPPED_COUNTRY)}",
            flush=True,
        )


def measure(key: str, opts: Options) -> Result:
    result = Result(options=asdict(opts))
    began = time.monotonic()
    stack = production_stack(opts.database)
    stream: Stream | None = None
    try:
        stack.start(workers=0)
        stack.sandbox_reset()
        for provider in (FIRST, NEXT):
            stack.sandbox_faults(provider=provider, latency_ms=50)
        start_queue_worker(stack, "urgent", URGENT_QUEUES, 2)
        start_queue_worker(stack, "maintenance", MAINTENANCE_QUEUES, 1)
        start_queue_worker(stack, "receipts", "receipts", 1)
        print(
            f"stack up (logs {stack.log_dir}); production settings: anomaly detection every 60 s on beat, "
            "1-min buckets, 120 s receipt maturity; sandbox Twilio and Vonage 50 ms per send; SMS route twilio, vonage",
            flush=True,
        )

        result.backfill = backfill(opts, datetime.now(UTC))
        b = result.backfill
        print(
            f"baseline BACKFILLED (not live): {b['buckets']} minute buckets of twilio sms, {b['from'][11:16]} to "
            f"{b['until'][11:16]} UTC, seeded Poisson at {opts.rate:g} msg/s "
            f"({', '.join(f'{c} {n:,}' for c, n in b['messages'].items())} messages), 100 % receipted and "
            f"delivered within the maturity as the fault-free sandbox delivers",
            flush=True,
        )
        stream = Stream(stack, key, opts.rate, opts.priority, opts.seed)
        stream.start()
        time.sleep(0.5)
        result.started = stream.first
        watch = Watch(result, stream, result.started + opts.max_minutes * 60)
        print(
            f"posting {opts.rate:g} {opts.priority} SMS/s ({', '.join(f'{c} {s:.0%}' for c, s in MIX)}) "
            f"through POST /api/v1/messages/; drop in {opts.steady_min:g} min",
            flush=True,
        )
        watch.sleep(opts.steady_min * 60)

        stack.sandbox_faults(provider=FIRST, drop_rules=[{"prefix": DROPPED_PREFIX, "rate": opts.drop}])
        result.t0 = time.time()
        print(
            f"T0 {_utc(result.t0)}: sandbox drops {opts.drop:.0%} of twilio's messages to {DROPPED_PREFIX}", flush=True
        )
        result.alert_at = watch.until(lambda: dropped_alert() is not None, 15 * 60, "alert (twilio, GB)")
        if result.alert_at is not None:
            alert = dropped_alert()
            result.alert_at = alert.opened_at.timestamp()
            result.alert = (
                f"{alert.kind} ({alert.severity}): {alert.observed:.1%} against {alert.baseline:.1%} "
                f"over {alert.recent_samples} samples"
            )
            print(f"  {stamp(result.alert_at, result.t0)}: alert opened: {result.alert}", flush=True)
            found = watch.until(lambda: route_condition(DROPPED_COUNTRY) == "degraded", 5 * 60, "route degraded")
            if found is not None:
                result.degraded_at = _changed_at(DROPPED_COUNTRY, "degraded") or found
                print(f"  {stamp(result.degraded_at, result.t0)}: (twilio, GB) degraded", flush=True)
                watch.sleep(opts.degraded_min * 60)

        stack.sandbox_faults(provider=FIRST, drop_rules=[])
        result.t1 = time.time()
        print(f"T1 {stamp(result.t1, result.t0)}: drop stopped (drop_rules [])", flush=True)
        if result.degraded_at is not None:
            found = watch.until(lambda: route_condition(DROPPED_COUNTRY) == "healthy", 30 * 60, "route healthy")
            if found is not None:
                result.healthy_at = _changed_at(DROPPED_COUNTRY, "healthy") or found
                print(
                    f"  {stamp(result.healthy_at, result.t0)}: (twilio, GB) healthy again, "
                    f"{(result.healthy_at - result.t1) / 60:.1f} min after the drop stopped",
                    flush=True,
                )
                watch.sleep(min(opts.after_min * 60, max(0.0, watch.left())))
        stream.stopping.set()
        stream.join(60)
        result.ended = stream.last
        result.posted, result.post_errors = stream.posted, stream.errors[:20]
        print(f"stream stopped: {stream.posted:,} posted, {len(stream.errors)} refused; settling", flush=True)
        settle(opts.settle_s)
        tabulate(result)
    except BaseException:
        print(f"failed; the last lines of each process's log:\n{stack.logs()[-8000:]}", flush=True)
        raise
    finally:
        if stream is not None:
            stream.stopping.set()
        stop_stack(stack)
    result.elapsed_s = time.monotonic() - began
    return result


def _utc(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%H:%M:%S UTC")


def _changed_at(country: str, condition: str) -> float | None:
    from messaging.models import RoutingChange

    change = (
        RoutingChange.objects.filter(provider=FIRST, country=country, to_condition=condition)
        .order_by("-created_at")
        .first()
    )
    return change.created_at.timestamp() if change is not None else None


def settle(seconds: float) -> None:
    """Wait until every message is dispatched, every Vonage one receipted and every receipt applied
    (or `seconds`); Twilio's dropped messages never will be."""
    from messaging.models import Message, Receipt

    stop = time.time() + seconds
    while time.time() < stop:
        mine = Message.objects.filter(category=CATEGORY)
        # Vonage drops nothing: a Vonage message still `dispatched` waits for its receipt.
        moving = mine.filter(state="accepted").exists() or mine.filter(state="dispatched", provider=NEXT).exists()
        if not moving and not Receipt.objects.filter(processed_at__isnull=True).exists():
            break
        time.sleep(2)
    time.sleep(5)  # the last callbacks of the last sends (200 ms) and their application


# --- the figures ----------------------------------------------------------------------------------
def tabulate(result: Result) -> None:
    from messaging.models import Message, RoutingChange
    from reconciliation.models import Alert

    rows = Message.objects.filter(category=CATEGORY).values_list("created_at", "to", "provider", "state")
    t0 = result.t0
    minutes: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    windows: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for created_at, to, provider, state in rows:
        if state == "accepted":  # never sent by the end: no provider to count it under
            result.undispatched += 1
            continue
        created = created_at.timestamp()
        country = next(c for c, p in PREFIX.items() if to.startswith(p))
        cell = minutes[math.floor((created - t0) / 60)]
        delivered = state in ("delivered", "read")
        for target in (cell, windows[phase(created, result)]):
            target[f"{country}"] += 1
            target[f"{country}:{provider}"] += 1
            if delivered:
                target[f"{country}:{provider}:delivered"] += 1
                target[f"{country}:delivered"] += 1
    result.minutes = [{"minute": m, **counts} for m, counts in sorted(minutes.items())]
    result.windows = {name: dict(counts) for name, counts in windows.items()}
    result.alerts = [
        f"{_rel(a.opened_at.timestamp(), t0)} {a.kind} {a.channel}/{a.provider}/{a.country or 'all'} "
        f"({a.observed:.1%} vs {a.baseline:.1%}, {a.recent_samples} samples)"
        + (f", resolved {_rel(a.resolved_at.timestamp(), t0)}" if a.resolved_at else ", still open")
        for a in Alert.objects.order_by("opened_at")
    ]
    result.changes = [
        f"{_rel(c.created_at.timestamp(), t0)} {c} by {c.source}: {c.reason[:120]}"
        for c in RoutingChange.objects.order_by("created_at")
    ]
    steady = result.windows.get("steady", {})
    result.pre_drop_rates = {
        c: f"{steady.get(f'{c}:delivered', 0)}/{steady.get(c, 0)} delivered" for c, _ in MIX if steady.get(c)
    }


def _rel(moment: float, t0: float) -> str:
    return stamp(moment, t0)


def phase(created: float, result: Result) -> str:
    if created < result.t0:
        return "steady"
    if result.degraded_at is None or created < result.degraded_at:
        return "drop, before degradation"
    if result.t1 is None or created < result.t1:
        return "drop, degraded"
    if result.healthy_at is None or created < result.healthy_at:
        return "drop stopped, degraded"
    return "healthy again"


def share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def minute_table(result: Result) -> str:
    lines = [
        "| minute (from T0) | GB sent | GB via vonage & delivered | GB via twilio | GB delivered | "
        "US+FR sent | US+FR via twilio | (twilio, GB) at the minute's end |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result.minutes:
        gb, others = row.get("GB", 0), row.get("US", 0) + row.get("FR", 0)
        on_twilio = row.get(f"US:{FIRST}", 0) + row.get(f"FR:{FIRST}", 0)
        end = result.t0 + (row["minute"] + 1) * 60
        lines.append(
            f"| {row['minute']:+d} | {gb} | {share(row.get(f'GB:{NEXT}:delivered', 0), gb)} | "
            f"{share(row.get(f'GB:{FIRST}', 0), gb)} | {share(row.get('GB:delivered', 0), gb)} | {others} | "
            f"{share(on_twilio, others)} | {condition_at(end, result)} |"
        )
    return "\n".join(lines)


def condition_at(moment: float, result: Result) -> str:
    if (
        result.degraded_at is not None
        and result.degraded_at <= moment
        and (result.healthy_at is None or moment < result.healthy_at)
    ):
        return "degraded"
    return "healthy"


def figures(result: Result) -> list[Figure]:
    opts = Options(**result.options)
    name = f"route failover, {opts.rate:g} msg/s {opts.priority} SMS, {opts.drop:.0%} silent drop to GB on twilio"
    out = []
    if result.alert_at is not None:
        took = result.alert_at - result.t0
        out.append(
            Figure(name, "alert naming twilio and GB, after T0", f"{took / 60:.1f} min", result.alert,
                   "<= 10 min", "PASS" if took <= LIMIT_S else "FAIL")
        )  # fmt: skip
    else:
        out.append(Figure(name, "alert naming twilio and GB, after T0", "none", "-", "<= 10 min", "FAIL"))
    if result.degraded_at is not None:
        out.append(Figure(name, "(twilio, GB) degraded, after T0", f"{(result.degraded_at - result.t0) / 60:.1f} min"))
    degraded = result.windows.get("drop, degraded", {})
    gb = degraded.get("GB", 0)
    good = degraded.get(f"GB:{NEXT}:delivered", 0)
    out.append(
        Figure(
            name,
            "new GB messages via vonage and delivered, degradation -> T1",
            f"{share(good, gb)} ({good:,} of {gb:,})",
            f"via twilio (probe share) {share(degraded.get(f'GB:{FIRST}', 0), gb)}",
            ">= 90 %",
            "PASS" if gb and good / gb >= 0.9 else "FAIL",
        )
    )
    after_t0 = [w for n, w in result.windows.items() if n != "steady"]
    others = sum(w.get("US", 0) + w.get("FR", 0) for w in after_t0)
    on_twilio = sum(w.get(f"US:{FIRST}", 0) + w.get(f"FR:{FIRST}", 0) for w in after_t0)
    touched = [c for c in result.changes if f"{FIRST} (GB)" not in c]
    out.append(
        Figure(
            name,
            "US and FR messages via twilio from T0 on; other routing changes",
            f"{share(on_twilio, others)} ({on_twilio:,} of {others:,}); {len(touched)} other changes",
            "-",
            ">= 99 %, none",
            "PASS" if others and on_twilio / others >= 0.99 and not touched else "FAIL",
        )
    )
    if result.healthy_at is not None and result.t1 is not None:
        took = result.healthy_at - result.t1
        back = result.windows.get("healthy again", {})
        gb_back = back.get("GB", 0)
        out.append(
            Figure(
                name,
                "(twilio, GB) healthy again, after the drop stopped (T1)",
                f"{took / 60:.1f} min",
                f"GB via twilio afterwards {share(back.get(f'GB:{FIRST}', 0), gb_back)} of {gb_back:,}",
                "<= 10 min",
                "PASS" if took <= LIMIT_S else "FAIL",
            )
        )
    else:
        waited = (result.ended - result.t1) / 60 if result.t1 else 0.0
        out.append(
            Figure(
                name, "(twilio, GB) healthy again, after the drop stopped (T1)", f"not within {waited:.1f} min",
                "-", "<= 10 min", "FAIL" if waited >= LIMIT_S / 60 else "not reached (run cut short)",
            )
        )  # fmt: skip
    out.append(
        Figure(
            name, "messages still not dispatched after settling (left out of the shares)", f"{result.undispatched:,}"
        )
    )
    return out


def report(result: Result) -> None:
    print(f"\nbaseline: BACKFILLED ({result.backfill.get('buckets', 0)} buckets, {result.backfill.get('from', '')} to "
          f"{result.backfill.get('until', '')}, 100 % receipted and delivered); live cohorts before the drop: "
          f"{result.pre_drop_rates}")  # fmt: skip
    print(
        f"posted {result.posted:,} ({len(result.post_errors)} refused) "
        f"over {(result.ended - result.started) / 60:.1f} min; {result.undispatched:,} still not dispatched "
        "after settling (left out of the tables)"
    )
    print(f"T0 {_utc(result.t0)}" + (f", T1 {stamp(result.t1, result.t0)}" if result.t1 else ""))
    print("\nalerts:")
    for line in result.alerts or ["(none)"]:
        print(f"  {line}")
    print("routing changes:")
    for line in result.changes or ["(none)"]:
        print(f"  {line}")
    print("\nper minute of creation (minute 0 starts at T0):\n")
    print(minute_table(result))
    print("\nby phase:\n")
    print("| phase | GB sent | GB via vonage & delivered | GB via twilio | US+FR via twilio |")
    print("|---|---:|---:|---:|---:|")
    for name in ("steady", "drop, before degradation", "drop, degraded", "drop stopped, degraded", "healthy again"):
        w = result.windows.get(name)
        if not w:
            continue
        gb, others = w.get("GB", 0), w.get("US", 0) + w.get("FR", 0)
        on_twilio = w.get(f"US:{FIRST}", 0) + w.get(f"FR:{FIRST}", 0)
        print(
            f"| {name} | {gb:,} | {share(w.get(f'GB:{NEXT}:delivered', 0), gb)} | "
            f"{share(w.get(f'GB:{FIRST}', 0), gb)} | {share(on_twilio, others)} |"
        )
    print_figures(figures(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=20.0, help="SMS posted per second (20)")
    parser.add_argument("--drop", type=float, default=0.3, help="share of twilio's +44 messages dropped (0.3)")
    parser.add_argument("--max-minutes", type=float, default=30.0, help="the live phase at most (30)")
    parser.add_argument("--steady", type=float, default=2.0, help="minutes of traffic before the drop (2)")
    parser.add_argument("--degraded", type=float, default=5.0, help="minutes degraded before the drop stops (5)")
    parser.add_argument("--after", type=float, default=2.0, help="minutes watched after the route is healthy (2)")
    parser.add_argument("--priority", default="transactional", choices=("bulk", "transactional", "critical"))
    parser.add_argument("--database", default=DATABASE, help=f"dropped and created again ({DATABASE})")
    parser.add_argument("--quick", action="store_true", help="smoke: 0.5 min steady, 2 min live at most")
    parser.add_argument("--json")
    args = parser.parse_args()
    opts = Options(
        rate=args.rate, drop=args.drop, steady_min=args.steady, degraded_min=args.degraded, after_min=args.after,
        max_minutes=args.max_minutes, priority=args.priority, quick=args.quick, database=args.database,
    )  # fmt: skip
    if args.quick:
        opts.steady_min, opts.degraded_min, opts.after_min, opts.max_minutes, opts.settle_s = 0.5, 0.5, 0.5, 2.0, 10.0
    stop_on_sigterm()
    key = fresh_database(opts.database)
    result = measure(key, opts)
    report(result)
    print(f"\n({result.elapsed_s / 60:.1f} min)")
    write_json(args.json, figures(result), asdict(result))


if __name__ == "__main__":
    main()
