"""Alerts: the detector's findings opened, refreshed and resolved, and told to whoever listens.

Every alert that opens or resolves is logged as one structured line, sent to Sentry when it is
configured, and POSTed as JSON to ALERT_WEBHOOK_URL by a task of its own (with retries), so a
failing endpoint never holds up detection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import current_app
from django.db import IntegrityError, transaction
from django.utils import timezone

from providers.registry import PROVIDER_CLASSES, provider_class
from reconciliation.anomalies import AlertKind, DetectorSettings, Finding, Series, detect, recovered
from reconciliation.buckets import buckets_refresh, series_by_route
from reconciliation.conf import detector_settings, reconciliation_setting
from reconciliation.models import Alert
from reconciliation.route_actions import routes_follow_alerts

logger = logging.getLogger(__name__)

# reconciliation.tasks.post_alert, published by name: a service does not import its tasks.
POST_ALERT_TASK = "reconciliation.post_alert"


@dataclass
class DetectionReport:
    buckets: int = 0
    opened: int = 0
    resolved: int = 0
    still_open: int = 0


def anomalies_detect(*, now: datetime | None = None) -> DetectionReport:
    """One detection tick: recount the buckets, judge every channel and provider (and each of its
    destination countries), open and resolve alerts, and degrade or restore the routes they name."""
    now = now or timezone.now()
    settings = detector_settings()
    report = DetectionReport(buckets=buckets_refresh(now=now, settings=settings))
    return anomalies_judge(series_by_route(now=now, settings=settings), now=now, settings=settings, report=report)


def anomalies_judge(
    series: Mapping[tuple[str, str, str], Series],
    *,
    now: datetime,
    settings: DetectorSettings,
    report: DetectionReport | None = None,
) -> DetectionReport:
    """Judge each (channel, provider, country) series at `now`: open and resolve alerts, and
    degrade or restore the routes they name on the same tick. (The simulations call it directly.)"""
    report = report or DetectionReport()
    open_alerts = {
        (a.channel, a.provider, a.country, a.kind, a.error_type): a for a in Alert.objects.filter(resolved_at=None)
    }
    firing = set()
    opened: list[Alert] = []
    # Countries first: a provider-wide drop their own alerts explain must not take the provider
    # out of every country on the same tick (reconciliation.route_actions).
    for (channel, provider, country), route_series in sorted(series.items(), key=lambda item: item[0][2] == ""):
        expects_receipts = provider in PROVIDER_CLASSES and provider_class(provider).has_receipts
        findings = detect(
            route_series, now=now, settings=settings, expects_receipts=expects_receipts, drops_only=bool(country)
        )
        for finding in findings:
            key = (channel, provider, country, finding.kind, finding.error_type)
            firing.add(key)
            if key in open_alerts:
                Alert.objects.filter(pk=open_alerts[key].pk).update(last_seen_at=now)
                continue
            alert = alert_open(channel=channel, provider=provider, country=country, finding=finding, now=now)
            if alert is not None:
                report.opened += 1
                opened.append(alert)
    resolved: list[Alert] = []
    for key, alert in open_alerts.items():
        if key in firing:
            continue
        route_series = series.get((alert.channel, alert.provider, alert.country))
        if route_series is None:
            continue  # no traffic at all: nothing says it recovered
        back = recovered(
            route_series,
            now=now,
            settings=settings,
            kind=alert.kind,
            error_type=alert.error_type,
            baseline=alert.baseline,
        )
        if back:
            alert_resolve(alert=alert, now=now)
            report.resolved += 1
            resolved.append(alert)
    routes_follow_alerts(
        opened=opened, resolved=resolved, series=series, now=now, settings=settings, summary=alert_summary
    )
    report.still_open = Alert.objects.filter(resolved_at=None).count()
    return report


def alert_open(*, channel: str, provider: str, country: str = "", finding: Finding, now: datetime) -> Alert | None:
    """Store a new alert and tell; None if one is already open for the same signal (a concurrent tick)."""
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                kind=finding.kind,
                error_type=finding.error_type,
                channel=channel,
                provider=provider,
                country=country,
                severity=finding.severity,
                observed=finding.observed,
                baseline=finding.baseline,
                recent_samples=finding.recent_samples,
                baseline_samples=finding.baseline_samples,
                score=min(finding.score, 1e9),
                window_start=finding.window_start,
                window_end=finding.window_end,
                opened_at=now,
                last_seen_at=now,
            )
            transaction.on_commit(lambda: alert_notify(alert=alert, event="opened"))
    except IntegrityError:
        return None
    return alert


def alert_resolve(*, alert: Alert, now: datetime) -> None:
    if Alert.objects.filter(pk=alert.pk, resolved_at=None).update(resolved_at=now):
        alert.resolved_at = now
        alert_notify(alert=alert, event="resolved")


def alert_payload(alert: Alert, event: str) -> dict[str, Any]:
    """What every channel of notification says about an alert."""
    return {
        "event": event,
        "id": alert.pk,
        "kind": alert.kind,
        "error_type": alert.error_type,
        "channel": alert.channel,
        "provider": alert.provider,
        "country": alert.country,
        "severity": alert.severity,
        "observed": alert.observed,
        "baseline": alert.baseline,
        "recent_samples": alert.recent_samples,
        "baseline_samples": alert.baseline_samples,
        "score": alert.score,
        "window_start": alert.window_start.isoformat(),
        "window_end": alert.window_end.isoformat(),
        "opened_at": alert.opened_at.isoformat(),
        "resolved_at": alert.resolved_at.isoformat() if alert.resolved_at else None,
        "detail": alert.detail,
    }


def alert_summary(alert: Alert) -> str:
    if alert.kind == AlertKind.CALLBACK_ENDPOINT_DISABLED:
        return f"callback endpoint disabled: {alert.detail}"
    if alert.kind == AlertKind.PERIODIC_JOB_OVERDUE:
        return f"periodic job overdue: {alert.detail}"
    what = f"{alert.kind} ({alert.error_type})" if alert.error_type else alert.kind
    if alert.kind == "latency_rise":
        change = f"{alert.observed:.0f} ms against {alert.baseline:.0f} ms"
    else:
        change = f"{alert.observed:.1%} against {alert.baseline:.1%}"
    to = f" to {alert.country}" if alert.country else ""
    return f"{what} on {alert.channel} via {alert.provider}{to}: {change} over {alert.recent_samples} samples"


def alert_notify(*, alert: Alert, event: str) -> None:
    """Log, Sentry, and the webhook (queued). Nothing here may raise into detection."""
    payload = alert_payload(alert, event)
    log = logger.warning if event == "opened" else logger.info
    log("alert %s: %s", event, alert_summary(alert), extra={"alert": payload})
    _to_sentry(alert, event)
    if reconciliation_setting("ALERT_WEBHOOK_URL"):
        try:
            current_app.send_task(POST_ALERT_TASK, args=[payload], retry=False)
        except Exception:  # the broker is down: the alert is stored and logged; nothing else to do
            logger.warning("alert %s %s: could not queue the webhook post", alert.pk, event, exc_info=True)


def _to_sentry(alert: Alert, event: str) -> None:
    try:
        import sentry_sdk
    except ImportError:  # pragma: no cover - sentry-sdk is a dependency
        return
    if not sentry_sdk.get_client().is_active():
        return
    with sentry_sdk.new_scope() as scope:
        for name in ("kind", "channel", "provider", "country", "severity", "error_type"):
            scope.set_tag(f"conductor.{name}", getattr(alert, name) or "-")
        level = ("error" if alert.severity == "critical" else "warning") if event == "opened" else "info"
        sentry_sdk.capture_message(f"Conductor alert {event}: {alert_summary(alert)}", level=level)
