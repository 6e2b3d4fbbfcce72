"""Settings of the reconciliation app, read through the one Conductor accessor."""

from __future__ import annotations

from dataclasses import fields

from messaging.conf import conductor_setting
from providers.conf import provider_config
from reconciliation.anomalies import DetectorSettings

DETECTOR_FIELDS = frozenset(f.name for f in fields(DetectorSettings))
DEFAULT_RECEIPT_HORIZON_SECONDS = 72 * 3600.0


def detector_settings() -> DetectorSettings:
    """DetectorSettings with CONDUCTOR["ANOMALY"]'s overrides (checked at start-up: conductor.E013/E014)."""
    overrides = dict(conductor_setting("ANOMALY"))
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
    if settings.min_samples < 1 or settings.z_threshold <= 0:
        problems.append("min_samples and z_threshold must be positive")
    return problems


def receipt_horizon_seconds(provider: str) -> float:
    """How long the provider may still report a final status; after it, delivery is unknown."""
    return float(provider_config(provider).get("RECEIPT_HORIZON_SECONDS", DEFAULT_RECEIPT_HORIZON_SECONDS))
