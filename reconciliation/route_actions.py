"""The detector's hand on routing (issue 24): a drop alert degrades its provider's route (for its
destination country, or for all), its resolution makes the route healthy again.

The detector only ever moves a route between healthy and degraded, and restores only what it
degraded itself (ProviderRoute.source == DETECTOR_SOURCE): an operator's drain, a drill's, or an
operator's own change of the route since is never undone. Every change goes through
messaging.route_health.provider_route_set, which logs it as a RoutingChange.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

from django.db import transaction

from messaging.models import ProviderRoute, RouteCondition, RoutingChange
from messaging.route_health import provider_route_set
from reconciliation.anomalies import DROP_KINDS, DetectorSettings, RemainderSeries, Series, detect
from reconciliation.buckets import ALL_COUNTRIES
from reconciliation.models import Alert

logger = logging.getLogger(__name__)

DETECTOR_SOURCE = "detector"


def routes_follow_alerts(
    *,
    opened: Sequence[Alert],
    resolved: Sequence[Alert],
    series: Mapping[tuple[str, str, str], Series],
    now: datetime,
    settings: DetectorSettings,
    summary,
) -> list[RoutingChange]:
    """Degrade the routes of the drop alerts that opened on this tick, restore those whose last
    drop alert resolved. `summary(alert)` words the reason."""
    changes = []
    for alert in opened:
        if alert.kind not in DROP_KINDS:
            continue
        if alert.country == ALL_COUNTRIES and _explained_by_countries(alert, series, now=now, settings=settings):
            logger.info("alert %s: the drop is its countries' own; the provider-wide route stays", alert.pk)
            continue
        change = route_degrade(provider=alert.provider, country=alert.country, reason=summary(alert))
        if change is not None:
            changes.append(change)
    for alert in resolved:
        if alert.kind not in DROP_KINDS or _drop_alert_open(alert.provider, alert.country):
            continue
        change = route_restore(provider=alert.provider, country=alert.country, reason=f"recovered: {summary(alert)}")
        if change is not None:
            changes.append(change)
    return changes


def route_degrade(*, provider: str, country: str, reason: str) -> RoutingChange | None:
    """Degrade a healthy route (no row is healthy). Leaves a drained or already degraded one as it
    is, and a country's route alone while the provider is drained for every country (the
    country's own row would take precedence over the drain)."""
    with transaction.atomic():
        rows = ProviderRoute.objects.select_for_update().filter(provider=provider, country__in={country, ALL_COUNTRIES})
        current = {row.country: row for row in rows}
        own = current.get(country)
        if own is not None and own.condition != RouteCondition.HEALTHY:
            return None
        everywhere = current.get(ALL_COUNTRIES)
        if country and everywhere is not None and everywhere.condition == RouteCondition.DRAINED:
            return None
        return provider_route_set(
            provider=provider,
            country=country,
            condition=RouteCondition.DEGRADED,
            reason=reason,
            source=DETECTOR_SOURCE,
        )


def route_restore(*, provider: str, country: str, reason: str) -> RoutingChange | None:
    """Make a route healthy again, only if its degraded condition is the detector's own."""
    with transaction.atomic():
        own = ProviderRoute.objects.select_for_update().filter(provider=provider, country=country).first()
        if own is None or own.condition != RouteCondition.DEGRADED or own.source != DETECTOR_SOURCE:
            return None
        return provider_route_set(
            provider=provider,
            country=country,
            condition=RouteCondition.HEALTHY,
            reason=reason,
            source=DETECTOR_SOURCE,
        )


def _drop_alert_open(provider: str, country: str) -> bool:
    """Another drop alert (the other kind, or another channel) still holds the route degraded."""
    return Alert.objects.filter(resolved_at=None, provider=provider, country=country, kind__in=DROP_KINDS).exists()


def _explained_by_countries(alert: Alert, series, *, now: datetime, settings: DetectorSettings) -> bool:
    """Whether a provider-wide drop disappears once the countries with their own open drop alert
    are taken out: then those countries are degraded and the rest keeps the provider."""
    countries = set(
        Alert.objects.filter(resolved_at=None, channel=alert.channel, provider=alert.provider, kind__in=DROP_KINDS)
        .exclude(country=ALL_COUNTRIES)
        .values_list("country", flat=True)
    )
    whole = series.get((alert.channel, alert.provider, ALL_COUNTRIES))
    if not countries or whole is None:
        return False
    parts = [
        series[(alert.channel, alert.provider, c)] for c in countries if (alert.channel, alert.provider, c) in series
    ]
    remainder = RemainderSeries(whole, parts)
    return not detect(remainder, now=now, settings=settings, drops_only=True)
