"""Routing that acts on what receipts say (issue 24): each provider's condition (healthy, degraded,
drained) and weight, per destination country or for all, and the one write that changes them.

Who changes a route: the receipt detector (reconciliation.anomalies: a provider whose delivery or
receipt rate dropped is degraded, and healthy again once it recovers), an operator (admin,
`manage.py routes`, the API) and a drill (`manage.py drill`). Every change goes through
provider_route_set, which records a RoutingChange and logs it. Dispatch reads the conditions
through provider_routes(), cached for ROUTE_CACHE_SECONDS in each process: one query every few
seconds, not one a claim.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import phonenumbers
from django.db import transaction
from django.utils import timezone

from messaging.models import ProviderRoute, RouteCondition, RoutingChange
from messaging.routing import Channel

logger = logging.getLogger(__name__)

ROUTE_CACHE_SECONDS = 2.0


class _Unset:
    pass


UNSET = _Unset()


@dataclass(frozen=True)
class RouteState:
    provider: str
    country: str  # "": every country
    condition: str
    weight: int | None


@functools.lru_cache(maxsize=65536)
def recipient_country(channel: str, to: str) -> str:
    """The ISO 3166-1 alpha-2 region of a phone number ("" for email or a number it cannot place)."""
    if channel == Channel.EMAIL:
        return ""
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(to, None))
    except phonenumbers.NumberParseException:
        return ""
    return region if region and region != "ZZ" else ""


def provider_route_set(
    *,
    provider: str,
    country: str = "",
    condition: str | None = None,
    weight: int | None | _Unset = UNSET,
    reason: str,
    source: str,
) -> RoutingChange | None:
    """Change a provider's condition and/or weight (for one country, or all with ""). Returns the
    RoutingChange recorded, or None when nothing changed. Locks the row: concurrent changers
    (the detector and an operator) each see the other's result."""
    now = timezone.now()
    with transaction.atomic():
        route, _ = ProviderRoute.objects.select_for_update().get_or_create(
            provider=provider, country=country, defaults={"changed_at": now}
        )
        new_condition = condition if condition is not None else route.condition
        new_weight = route.weight if isinstance(weight, _Unset) else weight
        if new_condition == route.condition and new_weight == route.weight:
            return None
        change = RoutingChange.objects.create(
            provider=provider,
            country=country,
            from_condition=route.condition,
            to_condition=new_condition,
            from_weight=route.weight,
            to_weight=new_weight,
            reason=reason[:300],
            source=source[:100],
            created_at=now,
        )
        route.condition, route.weight = new_condition, new_weight
        route.reason, route.source, route.changed_at = reason[:300], source[:100], now
        route.save()
    _cache.clear()
    logger.warning(
        "routing: %s%s %s -> %s (weight %s -> %s) by %s: %s",
        provider,
        f" ({country})" if country else "",
        change.from_condition,
        change.to_condition,
        change.from_weight,
        change.to_weight,
        source,
        reason,
        extra={
            "event": "routing_change",
            "provider": provider,
            "country": country,
            "from_condition": change.from_condition,
            "to_condition": change.to_condition,
            "source": source,
        },
    )
    return change


class _Cache:
    def __init__(self) -> None:
        self.loaded_at = float("-inf")
        self.states: dict[tuple[str, str], RouteState] = {}

    def clear(self) -> None:
        self.loaded_at = float("-inf")


_cache = _Cache()


def provider_routes(*, now: float | None = None) -> dict[tuple[str, str], RouteState]:
    """Every provider route that is not plain healthy-in-order, keyed by (provider, country);
    read at most every ROUTE_CACHE_SECONDS per process."""
    now = time.monotonic() if now is None else now
    if now - _cache.loaded_at >= ROUTE_CACHE_SECONDS:
        rows = ProviderRoute.objects.exclude(condition=RouteCondition.HEALTHY, weight__isnull=True)
        _cache.states = {
            (r.provider, r.country): RouteState(r.provider, r.country, r.condition, r.weight)
            for r in rows.only("provider", "country", "condition", "weight")
        }
        _cache.loaded_at = now
    return _cache.states


def route_state(provider: str, country: str, states: dict[tuple[str, str], RouteState]) -> RouteState | None:
    """The state that applies to a provider for a country: the country's own, else the provider's
    for every country, else None (healthy, in route order)."""
    if country:
        state = states.get((provider, country))
        if state is not None:
            return state
    return states.get((provider, ""))
