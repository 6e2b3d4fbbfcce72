"""The one accessor for the reconciliation layer's settings: the keys of settings.CONDUCTOR it owns,
merged over these defaults (reconciliation.checks rejects bad values)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from django.conf import settings

from providers.registry import provider_setting
from reconciliation.anomalies import DetectorSettings

DEFAULTS: dict[str, Any] = {
    # ...and polled again at most this often while the provider still has no final status
    # (after messaging's RECEIPT_TIMEOUT_SECONDS without a final receipt).
    "RECEIPT_REPOLL_SECONDS": 600.0,
    "RECEIPT_POLL_BATCH_SIZE": 200,
    # Messages read per query by a reconciliation run.
    "RECONCILE_BATCH_SIZE": 500,
    # Overrides of reconciliation.anomalies.DetectorSettings (field names), e.g. {"min_samples": 50}.
    "ANOMALY": {},
    # Delivery buckets older than this are deleted (the dashboard shows up to 7 days).
    "BUCKET_RETENTION_SECONDS": 8 * 86400.0,
    # Alerts are POSTed here as JSON when set (with retries; a failing endpoint never blocks detection).
    "ALERT_WEBHOOK_URL": None,
    # Dead letters deleted per statement by the retention job, so no delete holds locks for long.
    "DLQ_PURGE_BATCH_SIZE": 1000,
    # Delivered status callbacks (payload and attempt log) are deleted this long after they were
    # written; callbacks given up on stay with their dead letter (CASCADE when it is purged).
    "CALLBACK_RETENTION_SECONDS": 7 * 86400.0,
    # A client's callback endpoint failing without a success for this long is disabled and an
    # alert raised (reconciliation.callbacks, on beat).
    "CALLBACK_DISABLE_AFTER_SECONDS": 24 * 3600.0,
    # A periodic job (a task beat runs) is overdue when its last success (or, never having
    # succeeded, its first expected run) is older than this many of its intervals plus the grace:
    # three missed runs, not one late one (beat's ticks and a busy worker make single runs late),
    # and a minute so that one-second jobs are not judged on jitter (reconciliation.heartbeats).
    "PERIODIC_JOB_OVERDUE_INTERVALS": 3.0,
    "PERIODIC_JOB_OVERDUE_GRACE_SECONDS": 60.0,
}


def reconciliation_setting(name: str) -> Any:
    """A setting of this layer: the project's CONDUCTOR[name] over the default."""
    if name not in DEFAULTS:
        raise KeyError(f"unknown reconciliation setting {name!r}")
    return getattr(settings, "CONDUCTOR", {}).get(name, DEFAULTS[name])


DETECTOR_FIELDS = frozenset(f.name for f in fields(DetectorSettings))


def detector_settings() -> DetectorSettings:
    """DetectorSettings with CONDUCTOR["ANOMALY"]'s overrides (checked at start-up: conductor.E013/E014)."""
    overrides = dict(reconciliation_setting("ANOMALY"))
    if "windows_seconds" in overrides:
        overrides["windows_seconds"] = tuple(sorted(overrides["windows_seconds"]))
    return DetectorSettings(**overrides)


def detector_settings_problems(overrides: dict) -> list[str]:
    """What is wrong with a CONDUCTOR["ANOMALY"] block, in words (empty when it can work)."""
    unknown = sorted(set(overrides) - DETECTOR_FIELDS)
    if unknown:
        return [f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(DETECTOR_FIELDS))}"]
    try:
        settings = DetectorSettings(**{**overrides, "windows_seconds": tuple(overrides.get("windows_seconds", (1,)))})
    except TypeError as exc:
        return [str(exc)]
    problems = []
    if settings.bucket_seconds < 1:
        problems.append("bucket_seconds must be at least 1")
    windows = overrides.get("windows_seconds", DetectorSettings.windows_seconds)
    if not windows or any(w <= 0 or w % settings.bucket_seconds for w in windows):
        problems.append("windows_seconds must be positive whole multiples of bucket_seconds")
    if settings.baseline_seconds % settings.bucket_seconds or settings.baseline_seconds <= 0:
        problems.append("baseline_seconds must be a positive whole multiple of bucket_seconds")
    if settings.min_samples < 1 or settings.min_recovery_samples < 1 or settings.z_threshold <= 0:
        problems.append("min_samples, min_recovery_samples and z_threshold must be positive")
    return problems


def beat_schedule() -> dict[str, dict[str, Any]]:
    """The periodic jobs beat runs (settings.CELERY_BEAT_SCHEDULE): what heartbeats are judged against."""
    return getattr(settings, "CELERY_BEAT_SCHEDULE", None) or {}


def receipt_horizon_seconds(provider: str) -> float:
    """How long the provider may still report a final status; after it, delivery is unknown."""
    return float(provider_setting(provider, "RECEIPT_HORIZON_SECONDS"))
