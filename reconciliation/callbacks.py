"""Clients' callback endpoints that keep failing: disabled, with an alert (on beat, every minute).

An endpoint whose callbacks have all failed since `failing_since`, for longer than
CALLBACK_DISABLE_AFTER_SECONDS, is disabled through messaging's service (its pending callbacks
become dead letters, replayable once it works again) and an alert is stored and told (log,
Sentry, ALERT_WEBHOOK_URL) like the detector's. The alert resolves when the endpoint is enabled
again or deleted. The same tick parks callbacks left pending for an already disabled endpoint (an
outbox write that read the endpoint as enabled just before it was disabled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from messaging.callbacks.endpoints import callback_endpoint_disable, callbacks_park_pending
from messaging.logging import redacted_url
from messaging.models import Callback, CallbackEndpoint, CallbackState
from reconciliation.alerts import alert_notify, alert_resolve
from reconciliation.anomalies import AlertKind
from reconciliation.conf import reconciliation_setting
from reconciliation.models import Alert, AlertSeverity

logger = logging.getLogger(__name__)

ALERT_CHANNEL = "callback"


@dataclass
class EndpointSweepReport:
    disabled: list[int] = field(default_factory=list)  # endpoint ids
    parked: int = 0  # pending callbacks of those, parked
    swept: int = 0  # pending callbacks of endpoints disabled before, parked
    resolved: int = 0  # alerts of endpoints enabled again or deleted


def alert_provider(endpoint_id: int) -> str:
    """How an endpoint's alert names it (the alert's `provider` column: one open alert per endpoint)."""
    return f"endpoint:{endpoint_id}"


def callback_endpoints_disable_failing(*, now: datetime | None = None) -> EndpointSweepReport:
    """Disable every enabled endpoint failing for longer than CALLBACK_DISABLE_AFTER_SECONDS."""
    now = now or timezone.now()
    limit = reconciliation_setting("CALLBACK_DISABLE_AFTER_SECONDS")
    report = EndpointSweepReport()
    failing = CallbackEndpoint.objects.filter(enabled=True, failing_since__lt=now - timedelta(seconds=limit))
    for endpoint in failing.select_related("client").order_by("pk"):
        reason = f"failing since {endpoint.failing_since:%Y-%m-%d %H:%M:%S} UTC, over {limit / 3600:g} h"
        parked = callback_endpoint_disable(endpoint_id=endpoint.pk, reason=reason, now=now)
        if parked is None:
            continue  # disabled meanwhile by someone else
        report.disabled.append(endpoint.pk)
        report.parked += parked
        _alert_open(endpoint, parked=parked, limit=limit, now=now)
    stranded = list(
        Callback.objects.filter(state=CallbackState.PENDING, endpoint__enabled=False)
        .values_list("endpoint_id", flat=True)
        .distinct()
    )
    if stranded:
        report.swept = callbacks_park_pending(endpoint_ids=stranded, now=now)
    report.resolved = _resolve_recovered(now=now)
    return report


def _alert_open(endpoint: CallbackEndpoint, *, parked: int, limit: float, now: datetime) -> None:
    failing_for = (now - endpoint.failing_since).total_seconds()
    detail = (
        f"{endpoint.client.name}'s endpoint {endpoint.pk} ({redacted_url(endpoint.url)}) disabled: every callback "
        f"failed for {failing_for / 3600:.1f} h (since {endpoint.failing_since:%Y-%m-%d %H:%M:%S} UTC); "
        f"{parked} pending callbacks parked as dead letters. Enable it, then replay "
        f"(manage.py replay_dead_letters --kind callback --endpoint {endpoint.pk})."
    )
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                kind=AlertKind.CALLBACK_ENDPOINT_DISABLED,
                channel=ALERT_CHANNEL,
                provider=alert_provider(endpoint.pk),
                severity=AlertSeverity.WARNING,
                observed=failing_for,
                baseline=limit,
                recent_samples=parked,
                baseline_samples=0,
                score=0.0,
                window_start=endpoint.failing_since,
                window_end=now,
                opened_at=now,
                last_seen_at=now,
                detail=detail,
            )
            transaction.on_commit(lambda: alert_notify(alert=alert, event="opened"))
    except IntegrityError:  # one still open from an earlier disable: it says the same
        Alert.objects.filter(
            kind=AlertKind.CALLBACK_ENDPOINT_DISABLED, provider=alert_provider(endpoint.pk), resolved_at=None
        ).update(last_seen_at=now, detail=detail)


def _resolve_recovered(*, now: datetime) -> int:
    """Resolve the alerts of endpoints that are enabled again or gone."""
    open_alerts = list(Alert.objects.filter(kind=AlertKind.CALLBACK_ENDPOINT_DISABLED, resolved_at=None))
    if not open_alerts:
        return 0
    named = [int(a.provider.removeprefix("endpoint:")) for a in open_alerts if a.provider.startswith("endpoint:")]
    still_disabled = {
        alert_provider(pk)
        for pk in CallbackEndpoint.objects.filter(pk__in=named, enabled=False).values_list("pk", flat=True)
    }
    resolved = 0
    for alert in open_alerts:
        if alert.provider not in still_disabled:
            alert_resolve(alert=alert, now=now)
            resolved += 1
    return resolved
