"""Delivery buckets: counts per channel, provider and time bucket, recounted from the messages.

Each run recounts the buckets that can still change (cohorts younger than the receipt maturity
plus a margin, and any the last run did not reach, if beat was down) from the message and
attempt rows, and upserts them; older buckets are final. Recounting instead of incrementing on
every event keeps the send path free of hot counter rows and makes the job idempotent. PostgreSQL
does the counting (GROUP BY), so a busy minute's rows never come to Python; on SQLite they do.
"""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.db import connection
from django.db.models import Max
from django.utils import timezone
from phonenumbers import COUNTRY_CODE_TO_REGION_CODE

from messaging.lookup import LOOKUP_NOTE
from messaging.models import AttemptOutcome, DispatchAttempt, Message
from messaging.route_health import recipient_country
from messaging.routing import Channel
from reconciliation import histograms
from reconciliation.anomalies import Bucket, BucketSeries, DetectorSettings, floor_time
from reconciliation.models import DeliveryBucket

# Recount this far beyond the maturity: receipts written a little late, a beat tick missed.
REFRESH_MARGIN = timedelta(minutes=2)
# A receipt timestamp this far before our own dispatched write is the same send's receipt that
# overtook us; older ones belong to an earlier send generation and do not count.
OVERTAKE_SLACK = timedelta(seconds=60)
SENT_OUTCOMES = (
    AttemptOutcome.ACCEPTED,
    AttemptOutcome.TRANSIENT_ERROR,
    AttemptOutcome.PERMANENT_ERROR,
    AttemptOutcome.AMBIGUOUS,
)
FAILED_OUTCOMES = (AttemptOutcome.TRANSIENT_ERROR, AttemptOutcome.PERMANENT_ERROR, AttemptOutcome.AMBIGUOUS)
COUNTS = ("dispatched", "receipted", "delivered", "undelivered", "attempts", "latency_count")
SUMMED = (*COUNTS, "errors", "latency_sum_ms", "latency_sumsq_ms", "dispatch_latency", "delivery_latency")
# The country of the provider-wide buckets (and alerts): every destination.
ALL_COUNTRIES = ""
# (channel, provider, country, bucket start): one bucket's key.
Cell = tuple[str, str, str, datetime]
# Hour buckets summed from the detection buckets, so a day or a week on the dashboard reads a
# few hundred rows however many messages there were.
ROLLUP_SECONDS = 3600


def lookback(settings: DetectorSettings) -> timedelta:
    """How much history detection reads: the longest window, its baseline and the maturity."""
    return timedelta(
        seconds=max(settings.windows_seconds)
        + settings.baseline_seconds
        + settings.receipt_maturity_seconds
        + 2 * settings.bucket_seconds
    )


def buckets_refresh(*, now: datetime | None = None, settings: DetectorSettings) -> int:
    """Recount the buckets that may still change; returns how many were written."""
    now = now or timezone.now()
    bucket = timedelta(seconds=settings.bucket_seconds)
    # From the maturity back, or from where the last run (the newest bucket write) left off if
    # beat missed runs: a cohort counted young and never recounted would look like a drop.
    recent = DeliveryBucket.objects.filter(seconds=settings.bucket_seconds, start__gte=now - lookback(settings))
    last_run = recent.aggregate(last=Max("updated_at"))["last"]
    reached = min(now, last_run) if last_run is not None else now
    since = reached - timedelta(seconds=settings.receipt_maturity_seconds) - bucket - REFRESH_MARGIN
    since = floor_time(max(since, now - lookback(settings)), settings.bucket_seconds)
    counts: dict[Cell, dict[str, Any]] = defaultdict(_empty)
    _count_cohorts(counts, since, settings)
    _count_countries(counts, since, settings)
    _count_attempts(counts, since, settings)
    rows = _upsert(counts, seconds=settings.bucket_seconds, now=now)
    _roll_up(rows, now=now, settings=settings)
    return len(rows)


def _upsert(counts: dict[Cell, dict[str, Any]], *, seconds: int, now: datetime):
    """Write counted buckets over whatever an earlier count stored for the same slots."""
    rows = [
        DeliveryBucket(
            channel=channel, provider=provider, country=country, seconds=seconds, start=start, updated_at=now, **values
        )
        for (channel, provider, country, start), values in counts.items()
    ]
    DeliveryBucket.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["channel", "provider", "country", "seconds", "start"],
        update_fields=[*SUMMED, "updated_at"],
    )
    return rows


def buckets_rebuild(
    *,
    since: datetime,
    until: datetime,
    settings: DetectorSettings,
    chunk: timedelta = timedelta(hours=1),
    progress=None,
) -> int:
    """Recount every bucket between `since` and `until`, an hour at a time (and its hour roll-up).

    For history the periodic refresh never saw: after an upgrade that added a bucket field, or
    after beat was down longer than the detection lookback. Idempotent. Returns buckets written.
    """
    now = timezone.now()
    start = floor_time(since, ROLLUP_SECONDS)
    written = 0
    while start < until:
        end = min(start + chunk, until)
        counts: dict[Cell, dict[str, Any]] = defaultdict(_empty)
        _count_cohorts(counts, start, settings, until=end)
        _count_countries(counts, start, settings, until=end)
        _count_attempts(counts, start, settings, until=end)
        rows = _upsert(counts, seconds=settings.bucket_seconds, now=now)
        _roll_up(rows, now=now, settings=settings)
        written += len(rows)
        if progress is not None:
            progress(end)
        start = end
    return written


def _empty() -> dict[str, Any]:
    return {
        **dict.fromkeys(COUNTS, 0),
        "errors": {},
        "latency_sum_ms": 0.0,
        "latency_sumsq_ms": 0.0,
        "dispatch_latency": {},
        "delivery_latency": {},
    }


# Counted in the database on PostgreSQL; row by row on SQLite, which has no date_bin.
def _count_cohorts(counts, since: datetime, settings: DetectorSettings, until: datetime | None = None) -> None:
    if connection.vendor == "postgresql":
        _count_cohorts_grouped(counts, since, settings, until)
    else:
        _count_cohorts_by_row(counts, since, settings, until)


def _count_countries(counts, since: datetime, settings: DetectorSettings, until: datetime | None = None) -> None:
    """Each cohort again per destination country: dispatched, receipted, delivered, undelivered."""
    if connection.vendor == "postgresql":
        _count_countries_grouped(counts, since, settings, until)
    # On SQLite _count_cohorts_by_row counts the countries in the same pass.


def _count_attempts(counts, since: datetime, settings: DetectorSettings, until: datetime | None = None) -> None:
    if connection.vendor == "postgresql":
        _count_attempts_grouped(counts, since, settings, until)
    else:
        _count_attempts_by_row(counts, since, settings, until)


# The counting as PostgreSQL GROUP BYs: a bulk campaign puts 100k+ rows in the window, which cost
# seconds of CPU to walk in Python every minute; grouped, Python reads a few hundred rows. Buckets
# start on multiples of their length since the epoch, as floor_time's do.
BUCKET_START = "date_bin(%(bucket)s, {column}, TIMESTAMPTZ '1970-01-01 00:00:00+00')"
# histograms.slot(max(0, seconds)) of an interval: how many bounds it exceeds (bisect_left).
SLOT = "width_bucket(GREATEST({latency}, INTERVAL '0'), %(first_above)s)"
RECEIPTS = ("delivered_at", "read_at", "undelivered_at", "failed_at")
# Each GROUP BY lists its cheapest keys first: sorting the window's rows is most of the cost.
COHORTS_SQL = """
WITH cohort AS (
    SELECT channel, provider, priority, {start} AS start, dispatched_at,
           COALESCE(accepted_at, created_at) AS accepted_at, {receipts}
    FROM {message}
    WHERE dispatched_at >= %(since)s {until} AND provider <> ''
), sent AS (
    SELECT channel, provider, start, priority,
           COALESCE(delivered_at, read_at, undelivered_at, failed_at) IS NOT NULL AS receipted,
           COALESCE(delivered_at, read_at) IS NOT NULL AS delivered,
           COALESCE(undelivered_at, failed_at) IS NOT NULL AS undelivered,
           {dispatch_slot} AS dispatch_slot,
           CASE WHEN COALESCE(delivered_at, read_at) IS NOT NULL THEN {delivery_slot} END AS delivery_slot
    FROM cohort
)
SELECT start, dispatch_slot, delivery_slot, channel, provider, priority,
       count(*), count(*) FILTER (WHERE receipted), count(*) FILTER (WHERE delivered),
       count(*) FILTER (WHERE undelivered AND NOT delivered)
FROM sent
GROUP BY start, dispatch_slot, delivery_slot, channel, provider, priority
"""
# Every attempt names its channel but rows older than that field: only those ask the message.
ATTEMPTS_SQL = """
WITH call AS (
    SELECT {start} AS start, attempt.provider, attempt.latency_ms,
           COALESCE(
               NULLIF(attempt.channel, ''),
               (SELECT message.channel FROM {message} AS message WHERE message.id = attempt.message_id)
           ) AS channel,
           CASE WHEN attempt.outcome = ANY(%(failed)s) THEN COALESCE(NULLIF(attempt.error_type, ''), 'unknown') END
               AS error_type
    FROM {attempt} AS attempt
    WHERE attempt.ended_at >= %(since)s {until} AND attempt.outcome = ANY(%(sent)s) AND attempt.note <> %(lookup_note)s
)
SELECT start, channel, provider, GROUPING(error_type) = 0, error_type,
       count(*), count(latency_ms), COALESCE(sum(latency_ms), 0)::float8,
       COALESCE(sum(latency_ms::bigint * latency_ms), 0)::float8
FROM call
GROUP BY start, channel, provider, GROUPING SETS ((), (error_type))
"""


# Per destination country. A number's country is not a fixed prefix of it (+1 is the US, Canada
# and 23 other countries, told apart by the whole number), so the database groups by a key Python
# turns into a country: "+" and the first three digits where the calling code belongs to one
# country only (calling codes are prefix-free, so those digits fix it: +33 is France whatever
# follows), else the whole number, placed by phonenumbers (cached per number: the lookup costs
# tens of microseconds the first time). Rows read: one per shared-code recipient in the window
# plus a handful per other calling code.
COUNTRIES_SQL = """
WITH cohort AS (
    SELECT channel, provider, {start} AS start, "to" AS dest, {receipts}
    FROM {message}
    WHERE dispatched_at >= %(since)s {until} AND provider <> '' AND channel <> %(email)s
), keyed AS (
    SELECT channel, provider, start,
           CASE WHEN substr(dest, 2, 1) = ANY(%(shared)s) OR substr(dest, 2, 2) = ANY(%(shared)s)
                     OR substr(dest, 2, 3) = ANY(%(shared)s)
                THEN dest ELSE left(dest, 4) END AS key,
           COALESCE(delivered_at, read_at, undelivered_at, failed_at) IS NOT NULL AS receipted,
           COALESCE(delivered_at, read_at) IS NOT NULL AS delivered,
           COALESCE(undelivered_at, failed_at) IS NOT NULL AS undelivered
    FROM cohort
)
SELECT start, channel, provider, key,
       count(*), count(*) FILTER (WHERE receipted), count(*) FILTER (WHERE delivered),
       count(*) FILTER (WHERE undelivered AND NOT delivered)
FROM keyed
GROUP BY start, channel, provider, key
"""
SHARED_CALLING_CODES = sorted(str(code) for code, regions in COUNTRY_CODE_TO_REGION_CODE.items() if len(regions) > 1)


def _country(channel: str, key: str) -> str:
    """The ISO alpha-2 country of a number, or of a "+" and three digits key of a calling code
    that belongs to one country only; "" for none (email, non-geographic codes such as +800)."""
    if len(key) > 4:
        country = recipient_country(channel, key)
    else:
        country, digits = "", key[1:]
        for length in (1, 2, 3) if key.startswith("+") and digits.isdigit() else ():
            regions = COUNTRY_CODE_TO_REGION_CODE.get(int(digits[:length]))
            if regions:  # calling codes are prefix-free: the first that is one is the number's
                country = regions[0] if len(regions) == 1 else ""
                break
    return country if len(country) == 2 and country.isalpha() else ""


def _count_countries_grouped(counts, since: datetime, settings: DetectorSettings, until: datetime | None) -> None:
    window = "CASE WHEN {t} BETWEEN dispatched_at - %(slack)s AND dispatched_at + %(maturity)s THEN {t} END AS {t}"
    sql = COUNTRIES_SQL.format(
        start=BUCKET_START.format(column="dispatched_at"),
        receipts=", ".join(window.format(t=name) for name in RECEIPTS),
        message=connection.ops.quote_name(Message._meta.db_table),
        until="AND dispatched_at < %(until)s" if until is not None else "",
    )
    params = {
        "bucket": timedelta(seconds=settings.bucket_seconds),
        "since": since,
        "until": until,
        "slack": OVERTAKE_SLACK,
        "maturity": timedelta(seconds=settings.receipt_maturity_seconds),
        "email": Channel.EMAIL.value,
        "shared": SHARED_CALLING_CODES,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    for start, channel, provider, key, dispatched, receipted, delivered, undelivered in rows:
        country = _country(channel, key)
        if not country:
            continue
        cell = counts[(channel, provider, country, start)]
        cell["dispatched"] += dispatched
        cell["receipted"] += receipted
        cell["delivered"] += delivered
        cell["undelivered"] += undelivered


def _first_above(bound: float) -> timedelta:
    """The shortest latency, in whole microseconds as the database stores them, that
    histograms.slot puts above `bound` (a bound's own value goes into its slot)."""
    micros = math.floor(bound * 1_000_000)
    while timedelta(microseconds=micros).total_seconds() <= bound:
        micros += 1
    while timedelta(microseconds=micros - 1).total_seconds() > bound:
        micros -= 1
    return timedelta(microseconds=micros)


FIRST_ABOVE = [_first_above(bound) for bound in histograms.BOUNDS]


def _count_cohorts_grouped(counts, since: datetime, settings: DetectorSettings, until: datetime | None) -> None:
    """One row per cell, priority and pair of histogram slots observed: a few hundred a run."""
    window = "CASE WHEN {t} BETWEEN dispatched_at - %(slack)s AND dispatched_at + %(maturity)s THEN {t} END AS {t}"
    sql = COHORTS_SQL.format(
        start=BUCKET_START.format(column="dispatched_at"),
        receipts=", ".join(window.format(t=name) for name in RECEIPTS),
        message=connection.ops.quote_name(Message._meta.db_table),
        until="AND dispatched_at < %(until)s" if until is not None else "",
        dispatch_slot=SLOT.format(latency="dispatched_at - accepted_at"),
        delivery_slot=SLOT.format(latency="LEAST(delivered_at, read_at) - accepted_at"),
    )
    params = {
        "bucket": timedelta(seconds=settings.bucket_seconds),
        "since": since,
        "until": until,
        "slack": OVERTAKE_SLACK,
        "maturity": timedelta(seconds=settings.receipt_maturity_seconds),
        "first_above": FIRST_ABOVE,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    for start, dispatch_slot, delivery_slot, channel, provider, priority, *numbers in rows:
        cell = counts[(channel, provider, ALL_COUNTRIES, start)]
        dispatched, receipted, delivered, undelivered = numbers
        cell["dispatched"] += dispatched
        cell["receipted"] += receipted
        cell["delivered"] += delivered
        cell["undelivered"] += undelivered
        _histogram(cell["dispatch_latency"], priority)[dispatch_slot] += dispatched
        if delivery_slot is not None:  # those not delivered have none
            _histogram(cell["delivery_latency"], priority)[delivery_slot] += delivered


def _count_attempts_grouped(counts, since: datetime, settings: DetectorSettings, until: datetime | None) -> None:
    """One row per cell with its totals, and one per error type in it (GROUPING SETS).

    The latency sums are exact (bigint, numeric) and rounded to float once: the same as the
    Python float sums while those are exact (below 2**53 ms², far beyond a bucket's calls), and
    beyond that the nearest float rather than one that depends on the row order.
    """
    sql = ATTEMPTS_SQL.format(
        start=BUCKET_START.format(column="attempt.ended_at"),
        attempt=connection.ops.quote_name(DispatchAttempt._meta.db_table),
        message=connection.ops.quote_name(Message._meta.db_table),
        until="AND attempt.ended_at < %(until)s" if until is not None else "",
    )
    params = {
        "bucket": timedelta(seconds=settings.bucket_seconds),
        "since": since,
        "until": until,
        "failed": list(FAILED_OUTCOMES),
        "sent": list(SENT_OUTCOMES),
        "lookup_note": LOOKUP_NOTE,
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    for start, channel, provider, by_error_type, error_type, attempts, latency_count, *sums in rows:
        cell = counts[(channel, provider, ALL_COUNTRIES, start)]
        if by_error_type:
            if error_type is not None:  # the group of calls that did not fail has none
                cell["errors"][error_type] = cell["errors"].get(error_type, 0) + attempts
        else:
            cell["attempts"] += attempts
            cell["latency_count"] += latency_count
            cell["latency_sum_ms"] += sums[0]
            cell["latency_sumsq_ms"] += sums[1]


# Row by row in Python, where the database is not PostgreSQL (none Conductor runs on: `make run`
# with no DATABASE_URL runs PostgreSQL too); the grouped counts above must equal these
# (tests/reconciliation/test_buckets.py compares them).
def _count_cohorts_by_row(counts, since: datetime, settings: DetectorSettings, until: datetime | None) -> None:
    maturity = timedelta(seconds=settings.receipt_maturity_seconds)
    rows = Message.objects.filter(dispatched_at__gte=since).exclude(provider="")
    if until is not None:
        rows = rows.filter(dispatched_at__lt=until)
    fields = ("channel", "priority", "provider", "to", "accepted_at", "created_at", "dispatched_at")
    for channel, priority, provider, to, accepted_at, created_at, dispatched_at, *receipt_times in rows.values_list(
        *fields, *RECEIPTS
    ):
        delivered_at, read_at, undelivered_at, failed_at = (
            t if t is not None and dispatched_at - OVERTAKE_SLACK <= t <= dispatched_at + maturity else None
            for t in receipt_times
        )
        start = floor_time(dispatched_at, settings.bucket_seconds)
        country = _country(channel, to)
        if country:
            _count_receipts(
                counts[(channel, provider, country, start)], delivered_at, read_at, undelivered_at, failed_at
            )
        cell = counts[(channel, provider, ALL_COUNTRIES, start)]
        cell["dispatched"] += 1
        accepted_at = accepted_at or created_at
        dispatch_s = (dispatched_at - accepted_at).total_seconds()
        histograms.observe(_histogram(cell["dispatch_latency"], priority), dispatch_s)
        if delivered_at or read_at or undelivered_at or failed_at:
            cell["receipted"] += 1
        if delivered_at or read_at:
            cell["delivered"] += 1
            arrived = min(t for t in (delivered_at, read_at) if t is not None)
            histograms.observe(_histogram(cell["delivery_latency"], priority), (arrived - accepted_at).total_seconds())
        elif undelivered_at or failed_at:
            cell["undelivered"] += 1


def _count_receipts(cell, delivered_at, read_at, undelivered_at, failed_at) -> None:
    cell["dispatched"] += 1
    if delivered_at or read_at or undelivered_at or failed_at:
        cell["receipted"] += 1
    if delivered_at or read_at:
        cell["delivered"] += 1
    elif undelivered_at or failed_at:
        cell["undelivered"] += 1


def _histogram(by_priority: dict[str, list[int]], priority: str) -> list[int]:
    if priority not in by_priority:
        by_priority[priority] = histograms.empty()
    return by_priority[priority]


def _count_attempts_by_row(counts, since: datetime, settings: DetectorSettings, until: datetime | None) -> None:
    rows = DispatchAttempt.objects.filter(ended_at__gte=since, outcome__in=SENT_OUTCOMES).exclude(note=LOOKUP_NOTE)
    if until is not None:
        rows = rows.filter(ended_at__lt=until)
    rows = rows.values_list(
        "channel", "message__channel", "provider", "ended_at", "outcome", "error_type", "latency_ms"
    )
    for channel, message_channel, provider, ended_at, outcome, error_type, latency_ms in rows:
        cell = counts[
            (channel or message_channel, provider, ALL_COUNTRIES, floor_time(ended_at, settings.bucket_seconds))
        ]
        cell["attempts"] += 1
        if outcome in FAILED_OUTCOMES:
            kind = error_type or "unknown"
            cell["errors"][kind] = cell["errors"].get(kind, 0) + 1
        if latency_ms is not None:
            cell["latency_count"] += 1
            cell["latency_sum_ms"] += latency_ms
            cell["latency_sumsq_ms"] += float(latency_ms) ** 2


def _roll_up(written: list[DeliveryBucket], *, now: datetime, settings: DetectorSettings) -> int:
    """Re-sum the hour buckets the rewritten buckets belong to; returns how many were written."""
    if settings.bucket_seconds >= ROLLUP_SECONDS or ROLLUP_SECONDS % settings.bucket_seconds:
        return 0
    hours = {floor_time(row.start, ROLLUP_SECONDS) for row in written if row.country == ALL_COUNTRIES}
    if not hours:
        return 0
    sums: dict[Cell, dict[str, Any]] = defaultdict(_empty)
    # Only the provider-wide buckets: the dashboard's hours; a country's minutes serve detection only.
    parts = DeliveryBucket.objects.filter(
        country=ALL_COUNTRIES,
        seconds=settings.bucket_seconds,
        start__gte=min(hours),
        start__lt=max(hours) + timedelta(seconds=ROLLUP_SECONDS),
    )
    for part in parts:
        hour = floor_time(part.start, ROLLUP_SECONDS)
        if hour not in hours:
            continue
        total = sums[(part.channel, part.provider, ALL_COUNTRIES, hour)]
        for name in (*COUNTS, "latency_sum_ms", "latency_sumsq_ms"):
            total[name] += getattr(part, name)
        for kind, count in part.errors.items():
            total["errors"][kind] = total["errors"].get(kind, 0) + count
        for name in ("dispatch_latency", "delivery_latency"):
            for priority, counts in getattr(part, name).items():
                total[name][priority] = histograms.merged([total[name].get(priority, []), counts])
    return len(_upsert(sums, seconds=ROLLUP_SECONDS, now=now))


def series_by_route(*, now: datetime, settings: DetectorSettings) -> dict[tuple[str, str, str], BucketSeries]:
    """Each channel, provider and destination country's buckets over the detection lookback
    (country ALL_COUNTRIES: the provider-wide series). Read as tuples, not model instances: with
    countries there are a few thousand rows a tick (three hours of minutes per cohort)."""
    grouped: dict[tuple[str, str, str], list[Bucket]] = defaultdict(list)
    rows = DeliveryBucket.objects.filter(seconds=settings.bucket_seconds, start__gte=now - lookback(settings))
    fields = ("channel", "provider", "country", "start", *BUCKET_FIELDS)
    for channel, provider, country, start, *values in rows.order_by("start").values_list(*fields):
        grouped[(channel, provider, country)].append(
            Bucket(start=start, **dict(zip(BUCKET_FIELDS, values, strict=True)))
        )
    return {key: BucketSeries(buckets) for key, buckets in grouped.items()}


BUCKET_FIELDS = (
    "dispatched",
    "receipted",
    "delivered",
    "attempts",
    "errors",
    "latency_count",
    "latency_sum_ms",
    "latency_sumsq_ms",
)


def buckets_purge(*, now: datetime | None = None, older_than_s: float) -> int:
    """Delete buckets past their retention."""
    now = now or timezone.now()
    deleted, _ = DeliveryBucket.objects.filter(start__lt=now - timedelta(seconds=older_than_s)).delete()
    return deleted
