"""Delivery buckets: counts per channel, provider and time bucket, recounted from the messages.

Each run recounts the buckets that can still change (cohorts younger than the receipt maturity
plus a margin, and any the last run did not reach, if beat was down) from the message and
attempt rows, and upserts them; older buckets are final. Recounting instead of incrementing on
every event keeps the send path free of hot counter rows and makes the job idempotent.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Max
from django.utils import timezone

from messaging.lookup import LOOKUP_NOTE
from messaging.models import AttemptOutcome, DispatchAttempt, Message
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
    counts: dict[tuple[str, str, datetime], dict[str, Any]] = defaultdict(_empty)
    _count_cohorts(counts, since, settings)
    _count_attempts(counts, since, settings)
    rows = [
        DeliveryBucket(
            channel=channel, provider=provider, seconds=settings.bucket_seconds, start=start, updated_at=now, **c
        )
        for (channel, provider, start), c in counts.items()
    ]
    DeliveryBucket.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["channel", "provider", "seconds", "start"],
        update_fields=[*COUNTS, "errors", "latency_sum_ms", "latency_sumsq_ms", "updated_at"],
    )
    return len(rows)


def _empty() -> dict[str, Any]:
    return {**dict.fromkeys(COUNTS, 0), "errors": {}, "latency_sum_ms": 0.0, "latency_sumsq_ms": 0.0}


def _count_cohorts(counts, since: datetime, settings: DetectorSettings) -> None:
    maturity = timedelta(seconds=settings.receipt_maturity_seconds)
    rows = Message.objects.filter(dispatched_at__gte=since).exclude(provider="")
    for channel, provider, dispatched_at, *receipt_times in rows.values_list(
        "channel", "provider", "dispatched_at", "delivered_at", "read_at", "undelivered_at", "failed_at"
    ):
        delivered_at, read_at, undelivered_at, failed_at = (
            t if t is not None and dispatched_at - OVERTAKE_SLACK <= t <= dispatched_at + maturity else None
            for t in receipt_times
        )
        cell = counts[(channel, provider, floor_time(dispatched_at, settings.bucket_seconds))]
        cell["dispatched"] += 1
        if delivered_at or read_at or undelivered_at or failed_at:
            cell["receipted"] += 1
        if delivered_at or read_at:
            cell["delivered"] += 1
        elif undelivered_at or failed_at:
            cell["undelivered"] += 1


def _count_attempts(counts, since: datetime, settings: DetectorSettings) -> None:
    rows = (
        DispatchAttempt.objects.filter(ended_at__gte=since, outcome__in=SENT_OUTCOMES)
        .exclude(note=LOOKUP_NOTE)
        .values_list("channel", "message__channel", "provider", "ended_at", "outcome", "error_type", "latency_ms")
    )
    for channel, message_channel, provider, ended_at, outcome, error_type, latency_ms in rows:
        cell = counts[(channel or message_channel, provider, floor_time(ended_at, settings.bucket_seconds))]
        cell["attempts"] += 1
        if outcome in FAILED_OUTCOMES:
            kind = error_type or "unknown"
            cell["errors"][kind] = cell["errors"].get(kind, 0) + 1
        if latency_ms is not None:
            cell["latency_count"] += 1
            cell["latency_sum_ms"] += latency_ms
            cell["latency_sumsq_ms"] += float(latency_ms) ** 2


def series_by_route(*, now: datetime, settings: DetectorSettings) -> dict[tuple[str, str], BucketSeries]:
    """Each channel and provider's buckets over the detection lookback."""
    grouped: dict[tuple[str, str], list[Bucket]] = defaultdict(list)
    rows = DeliveryBucket.objects.filter(seconds=settings.bucket_seconds, start__gte=now - lookback(settings))
    for row in rows.order_by("start"):
        grouped[(row.channel, row.provider)].append(
            Bucket(
                start=row.start,
                dispatched=row.dispatched,
                receipted=row.receipted,
                delivered=row.delivered,
                attempts=row.attempts,
                errors=row.errors,
                latency_count=row.latency_count,
                latency_sum_ms=row.latency_sum_ms,
                latency_sumsq_ms=row.latency_sumsq_ms,
            )
        )
    return {key: BucketSeries(buckets) for key, buckets in grouped.items()}


def buckets_purge(*, now: datetime | None = None, older_than_s: float) -> int:
    """Delete buckets past their retention."""
    now = now or timezone.now()
    deleted, _ = DeliveryBucket.objects.filter(start__lt=now - timedelta(seconds=older_than_s)).delete()
    return deleted
