"""Delivery anomaly detection: a pure function of time-bucketed counts and an injected clock.

The seed problem is a provider that answers 200 and silently drops some messages: the only
signal is fewer receipts. Receipts lag their sends, so recent sends always look short of
receipts. The detector therefore compares *cohorts*: the messages dispatched in a bucket, counted
as receipted only if their receipt came within RECEIPT_MATURITY of dispatch, and evaluated only
once that maturity has passed. Every cohort is then measured at the same age, and a recent window
of cohorts is compared with the baseline window before it.

The test is Fisher's exact test on the window's misses against the baseline's, read as a z-score;
it accounts for sample size: a quiet channel needs a much larger drop to reach the threshold,
and a window with fewer than MIN_SAMPLES messages is not judged at all. An alert also needs a
minimum absolute change (points), so a busy channel does not alarm on a statistically real but
operationally meaningless wobble.
Several window lengths are tried, shortest first: a busy channel is caught within minutes, a
quiet one over the hour. Error rates per error type use the same test on attempts; latency uses
a Welch z-test on mean provider latency with a minimum ratio.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from statistics import NormalDist
from typing import Protocol

from django.db import models


class AlertKind(models.TextChoices):
    RECEIPT_RATE_DROP = "receipt_rate_drop"  # fewer sends get any receipt: a silent drop
    DELIVERY_RATE_DROP = "delivery_rate_drop"  # fewer sends are reported delivered
    ERROR_RATE_RISE = "error_rate_rise"  # more provider calls fail with one error type
    LATENCY_RISE = "latency_rise"  # provider calls take longer
    # Not the detector's: a client's callback endpoint failed too long and was disabled
    # (reconciliation.callbacks); channel "callback", provider "endpoint:<id>".
    CALLBACK_ENDPOINT_DISABLED = "callback_endpoint_disabled"
    # Not the detector's either: a periodic job (a task beat runs) has not succeeded for several of
    # its intervals (reconciliation.heartbeats); channel "beat", provider the task name.
    PERIODIC_JOB_OVERDUE = "periodic_job_overdue"


DROP_KINDS = (AlertKind.RECEIPT_RATE_DROP, AlertKind.DELIVERY_RATE_DROP)


@dataclass(frozen=True)
class DetectorSettings:
    """The detector's knobs (settings.CONDUCTOR["ANOMALY"]); each default's reason beside it."""

    # Counts are kept per bucket; windows are whole buckets.
    bucket_seconds: int = 60
    # A receipt counts for its cohort only if it came within this long of dispatch, and a cohort
    # is judged only once this old. Above the providers' usual receipt delay (tens of seconds).
    receipt_maturity_seconds: int = 120
    # Recent windows tried, shortest first: minutes for a busy channel, an hour for a quiet one.
    windows_seconds: tuple[int, ...] = (120, 300, 900, 3600)
    # What "normal" is: the two hours before the recent window.
    baseline_seconds: int = 7200
    # Fewer messages than this in the recent or the baseline window: no judgement either way.
    min_samples: int = 100
    # A drop alert's recovery needs only this many in the recent window: a degraded route keeps
    # only a probe share of its traffic (issue 24), and at 100 the window long enough to hold
    # them would still reach back into the drop. Fewer suffice here because the test is not
    # "is it worse" but "is it back within half the alerting change of the stored baseline", and a
    # drop big enough to act on is far outside that on 50 messages (docs/operations.md).
    min_recovery_samples: int = 50
    # z of 5: about 3 in 10 million by chance per test, so a day of minute-by-minute tests over
    # several windows and kinds stays quiet on noise.
    z_threshold: float = 5.0
    # The smallest change worth waking someone for, in rate points (0.05 = 5 points).
    min_rate_drop: float = 0.05
    min_error_rise: float = 0.05
    # Latency: the recent mean at least this many times the baseline's, and this much higher.
    latency_ratio: float = 2.0
    min_latency_rise_ms: float = 250.0


@dataclass(frozen=True)
class Totals:
    """Sums over a span of buckets."""

    dispatched: int = 0
    receipted: int = 0
    delivered: int = 0
    attempts: int = 0
    errors: Mapping[str, int] = field(default_factory=dict)
    latency_count: int = 0
    latency_sum_ms: float = 0.0
    latency_sumsq_ms: float = 0.0


class Series(Protocol):
    """One channel and provider's buckets; sums over [start, end) by bucket start time."""

    def totals(self, start: datetime, end: datetime) -> Totals: ...


@dataclass(frozen=True, kw_only=True)
class Bucket(Totals):
    """The counts of one bucket: a cohort of dispatched messages (receipted and delivered within the
    maturity), and the provider calls that ended in it."""

    start: datetime


_SCALARS = tuple(f.name for f in fields(Totals) if f.name != "errors")


class BucketSeries:
    """A Series over a list of Buckets, with prefix sums so every window costs the same."""

    def __init__(self, buckets: Sequence[Bucket]):
        ordered = sorted(buckets, key=lambda b: b.start)
        self.starts = [b.start for b in ordered]
        self.prefix = {name: [0.0] for name in _SCALARS}
        for bucket in ordered:
            for name in _SCALARS:
                self.prefix[name].append(self.prefix[name][-1] + getattr(bucket, name))
        self.errors = [b.errors for b in ordered]

    def totals(self, start: datetime, end: datetime) -> Totals:
        lo, hi = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        sums = {name: self.prefix[name][hi] - self.prefix[name][lo] for name in _SCALARS}
        errors: dict[str, int] = {}
        for bucket_errors in self.errors[lo:hi]:
            for error_type, count in bucket_errors.items():
                errors[error_type] = errors.get(error_type, 0) + count
        return Totals(
            dispatched=int(sums["dispatched"]),
            receipted=int(sums["receipted"]),
            delivered=int(sums["delivered"]),
            attempts=int(sums["attempts"]),
            errors=errors,
            latency_count=int(sums["latency_count"]),
            latency_sum_ms=sums["latency_sum_ms"],
            latency_sumsq_ms=sums["latency_sumsq_ms"],
        )


@dataclass(frozen=True)
class Finding:
    """One anomaly: what moved, how far, over which window, and how sure."""

    kind: str
    error_type: str  # the error type of an error_rate_rise, else ""
    observed: float
    baseline: float
    recent_samples: int
    baseline_samples: int
    window_start: datetime
    window_end: datetime
    score: float  # the z statistic
    severity: str  # "warning", or "critical" at twice the minimum change

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.error_type)


def floor_time(moment: datetime, seconds: int) -> datetime:
    """The start of the bucket holding `moment` (buckets are aligned on the epoch)."""
    epoch = moment.timestamp()
    return moment - timedelta(seconds=epoch - math.floor(epoch / seconds) * seconds)


def cohort_end(now: datetime, settings: DetectorSettings) -> datetime:
    """Cohorts starting before this are complete: their bucket closed `maturity` ago."""
    return floor_time(now - timedelta(seconds=settings.receipt_maturity_seconds), settings.bucket_seconds)


def attempt_end(now: datetime, settings: DetectorSettings) -> datetime:
    """Attempt buckets starting before this are closed."""
    return floor_time(now, settings.bucket_seconds)


# --- the statistics ---------------------------------------------------------------------------------
_NORMAL = NormalDist()


def excess_z(bad_recent: int, n_recent: int, bad_base: int, n_base: int) -> float:
    """How sure we are that the recent window has a larger share of bad outcomes, as a z-score.

    Fisher's exact one-sided test (hypergeometric tail), not the normal approximation: rates
    near 100 % make bad outcomes rare, and for a few of them the normal tail is far too thin (a
    quiet channel "at z = 5.4" had 11 misses where 2.3 were expected: about 1 in 50,000, not 1
    in 30 million). The p-value is turned back into a z so thresholds read the same everywhere.
    """
    if n_recent == 0 or n_base == 0 or bad_recent * n_base <= bad_base * n_recent:
        return 0.0
    bad, total = bad_recent + bad_base, n_recent + n_base
    good = total - bad
    log_first = _log_comb(bad, bad_recent) + _log_comb(good, n_recent - bad_recent) - _log_comb(total, n_recent)
    tail, term, k = 1.0, 1.0, bad_recent
    while k < min(bad, n_recent):  # P(X >= bad_recent), each term from the last by the pmf's ratio
        term *= (bad - k) * (n_recent - k) / ((k + 1) * (good - n_recent + k + 1))
        tail += term
        k += 1
        if term < tail * 1e-12:
            break
    log_p = log_first + math.log(tail)
    if log_p < -700:  # beyond floats: the tail's asymptote is plenty for a threshold
        return math.sqrt(-2 * log_p)
    return -_NORMAL.inv_cdf(min(math.exp(log_p), 0.5))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def mean_and_variance(count: int, total: float, total_sq: float) -> tuple[float, float]:
    mean = total / count
    return mean, max(0.0, total_sq / count - mean * mean)


def _severity(change: float, minimum: float) -> str:
    return "critical" if change >= 2 * minimum else "warning"


# --- detection --------------------------------------------------------------------------------------
def detect(
    series: Series,
    *,
    now: datetime,
    settings: DetectorSettings,
    expects_receipts: bool = True,
    drops_only: bool = False,
) -> list[Finding]:
    """Every anomaly visible at `now`, at most one per (kind, error type): the shortest window that shows it.

    drops_only: judge the receipt and delivery rates only (a destination country's cohort, which
    has no attempt counts of its own)."""
    found: dict[tuple[str, str], Finding] = {}
    for window in settings.windows_seconds:
        for finding in _window_findings(series, now, settings, window, expects_receipts):
            if not drops_only or finding.kind in DROP_KINDS:
                found.setdefault(finding.key, finding)
    return [finding for finding in found.values() if not _over(series, finding, now, settings)]


def _over(series: Series, finding: Finding, now: datetime, settings: DetectorSettings) -> bool:
    """A drop that long windows still show but the latest cohorts no longer do: over. Without
    this a drop followed by a fall in traffic (a degraded route keeps only a probe share) would
    fire on the hour window, full of the drop's busy minutes, long after its rate came back, and
    keep its alert (and the route) from recovering, or open it again once resolved."""
    if finding.kind not in DROP_KINDS:
        return False
    return bool(
        recovered(series, now=now, settings=settings, kind=finding.kind, error_type="", baseline=finding.baseline)
    )


class RemainderSeries:
    """A series minus some of its parts (the provider-wide cohort without some countries'), for
    the receipt counts only: whether a provider-wide drop is still there without them."""

    def __init__(self, whole: Series, parts: Sequence[Series]):
        self.whole, self.parts = whole, parts

    def totals(self, start: datetime, end: datetime) -> Totals:
        whole = self.whole.totals(start, end)
        counts = {"dispatched": whole.dispatched, "receipted": whole.receipted, "delivered": whole.delivered}
        for part in self.parts:
            part_totals = part.totals(start, end)
            for name in counts:
                counts[name] -= getattr(part_totals, name)
        return Totals(**{name: max(0, value) for name, value in counts.items()})


def _spans(end: datetime, window: int, settings: DetectorSettings) -> tuple[datetime, datetime, datetime]:
    start = end - timedelta(seconds=window)
    return start, end, start - timedelta(seconds=settings.baseline_seconds)


def _window_findings(
    series: Series, now: datetime, settings: DetectorSettings, window: int, expects_receipts: bool
) -> list[Finding]:
    findings = []
    if expects_receipts:
        start, end, base_start = _spans(cohort_end(now, settings), window, settings)
        recent, base = series.totals(start, end), series.totals(base_start, start)
        if recent.dispatched >= settings.min_samples and base.dispatched >= settings.min_samples:
            for kind, field_name in (
                (AlertKind.RECEIPT_RATE_DROP, "receipted"),
                (AlertKind.DELIVERY_RATE_DROP, "delivered"),
            ):
                finding = _drop(kind, recent, base, field_name, settings, start, end)
                if finding is not None:
                    findings.append(finding)
    start, end, base_start = _spans(attempt_end(now, settings), window, settings)
    recent, base = series.totals(start, end), series.totals(base_start, start)
    if recent.attempts >= settings.min_samples and base.attempts >= settings.min_samples:
        for error_type in sorted(set(recent.errors) | set(base.errors)):
            finding = _error_rise(error_type, recent, base, settings, start, end)
            if finding is not None:
                findings.append(finding)
    if recent.latency_count >= settings.min_samples and base.latency_count >= settings.min_samples:
        finding = _latency_rise(recent, base, settings, start, end)
        if finding is not None:
            findings.append(finding)
    return findings


def _drop(kind, recent: Totals, base: Totals, field_name: str, settings, start, end) -> Finding | None:
    x_recent, x_base = getattr(recent, field_name), getattr(base, field_name)
    observed, baseline = x_recent / recent.dispatched, x_base / base.dispatched
    if baseline - observed < settings.min_rate_drop:  # the cheap test first
        return None
    z = excess_z(recent.dispatched - x_recent, recent.dispatched, base.dispatched - x_base, base.dispatched)
    if z < settings.z_threshold:
        return None
    return Finding(
        kind, "", observed, baseline, recent.dispatched, base.dispatched, start, end, z,
        _severity(baseline - observed, settings.min_rate_drop),
    )  # fmt: skip


def _error_rise(error_type: str, recent: Totals, base: Totals, settings, start, end) -> Finding | None:
    x_recent, x_base = recent.errors.get(error_type, 0), base.errors.get(error_type, 0)
    observed, baseline = x_recent / recent.attempts, x_base / base.attempts
    if observed - baseline < settings.min_error_rise:
        return None
    z = excess_z(x_recent, recent.attempts, x_base, base.attempts)
    if z < settings.z_threshold:
        return None
    return Finding(
        AlertKind.ERROR_RATE_RISE, error_type, observed, baseline, recent.attempts, base.attempts, start, end, z,
        _severity(observed - baseline, settings.min_error_rise),
    )  # fmt: skip


def _latency_rise(recent: Totals, base: Totals, settings, start, end) -> Finding | None:
    mean_recent, var_recent = mean_and_variance(recent.latency_count, recent.latency_sum_ms, recent.latency_sumsq_ms)
    mean_base, var_base = mean_and_variance(base.latency_count, base.latency_sum_ms, base.latency_sumsq_ms)
    if mean_recent < settings.latency_ratio * mean_base or mean_recent - mean_base < settings.min_latency_rise_ms:
        return None
    spread = math.sqrt(var_recent / recent.latency_count + var_base / base.latency_count)
    z = (mean_recent - mean_base) / spread if spread > 0 else math.inf
    if z < settings.z_threshold:
        return None
    return Finding(
        AlertKind.LATENCY_RISE, "", mean_recent, mean_base, recent.latency_count, base.latency_count, start, end, z,
        "critical" if mean_recent >= 2 * settings.latency_ratio * mean_base else "warning",
    )  # fmt: skip


# --- recovery ---------------------------------------------------------------------------------------
def recovered(
    series: Series, *, now: datetime, settings: DetectorSettings, kind: str, error_type: str, baseline: float
) -> bool | None:
    """Whether an open alert's rate is back near the baseline it was raised against.

    Judged on the shortest window with enough samples (for a drop, min_recovery_samples on any
    whole number of buckets: a degraded route's probe share must be able to show it), against the
    baseline stored when the alert opened (the detector's own baseline drifts into the bad period
    if it lasts). Back within half the alerting change counts as recovered. None: too little
    traffic to tell; the alert stays open.
    """
    for window in _recovery_windows(settings) if kind in DROP_KINDS else settings.windows_seconds:
        observed = _observed(series, now, settings, window, kind, error_type)
        if observed is None:
            continue
        if kind in DROP_KINDS:
            return baseline - observed < settings.min_rate_drop / 2
        if kind == AlertKind.ERROR_RATE_RISE:
            return observed - baseline < settings.min_error_rise / 2
        return observed < baseline * (1 + (settings.latency_ratio - 1) / 2)
    return None


def _recovery_windows(settings: DetectorSettings) -> range:
    """Every whole number of buckets up to the longest window, shortest first. A degraded route's
    probe share fills min_recovery_samples in a few minutes; with the detection windows only (2,
    5, 15 min) the next window up would reach back into the drop and hold the route down for its
    whole length after the provider recovered (bench/route_failover.py: 11+ min on 5 min)."""
    return range(settings.bucket_seconds, max(settings.windows_seconds) + 1, settings.bucket_seconds)


def _observed(series: Series, now: datetime, settings, window: int, kind: str, error_type: str) -> float | None:
    if kind in DROP_KINDS:
        end = cohort_end(now, settings)
        recent = series.totals(end - timedelta(seconds=window), end)
        if recent.dispatched < settings.min_recovery_samples:
            return None
        return (recent.receipted if kind == AlertKind.RECEIPT_RATE_DROP else recent.delivered) / recent.dispatched
    end = attempt_end(now, settings)
    recent = series.totals(end - timedelta(seconds=window), end)
    if kind == AlertKind.ERROR_RATE_RISE:
        return recent.errors.get(error_type, 0) / recent.attempts if recent.attempts >= settings.min_samples else None
    return recent.latency_sum_ms / recent.latency_count if recent.latency_count >= settings.min_samples else None
