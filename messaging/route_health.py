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
from collections.abc import Callable
from dataclasses import dataclass

import phonenumbers
from django.db import transaction
from django.utils import timezone

from messaging.models import ProviderRoute, RouteCondition, RoutingChange
from messaging.routing import Channel, Hop, Priority

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
    """The state that applies to a provider for a country, as dispatch reads it (hops_ordered):
    of its row for the country and its row for every country, the worse condition (an operator's
    drain of every country is not undone by a country's healthy row); None: healthy, route order."""
    return _route_effective(provider, country, states)


# Plain strings: an enum member's look-up costs more than the rest of a hop's ordering.
_HEALTHY, _DEGRADED, _DRAINED = (
    str(c.value) for c in (RouteCondition.HEALTHY, RouteCondition.DEGRADED, RouteCondition.DRAINED)
)


_PROBING = frozenset({str(Priority.BULK.value), str(Priority.TRANSACTIONAL.value)})


def probe_share_for(priority: str, share: float) -> float:
    """The share of a priority's messages that keep a degraded provider in its place: bulk and
    transactional at the full share, a critical message never (it goes to a healthy provider
    whenever the route has one). Transactional probes at the full share too: a 2FA stream with
    no campaign beside it is often a route's only traffic, and at half the share its receipts
    took longer than 10 minutes to show a recovery (bench/route_failover.py, issue 24)."""
    return share if priority in _PROBING else 0.0


def hops_ordered(
    hops: list[Hop],
    *,
    priority: str,
    states: dict[tuple[str, str], RouteState],
    draw: Callable[[], float],
    probe_share: float,
) -> list[Hop]:
    """A message's route as the routes' conditions and weights order it, once per message (the
    same list serves every round of its claim). Pure: `states` is provider_routes(), `draw` a
    random source in [0, 1) (random.random; a seeded one in tests).

    Each channel's providers (a run of hops with the same channel and address; the recipient's
    country from that address) are reordered among themselves, never across channels, so every
    hop is still tried on failure, in the new order:
    - healthy providers first; with weights, the first place goes to one of those with a weight
      above 0, drawn in proportion to the weights; the others keep the route's order;
    - degraded providers next, except for a probe share of messages (probe_share_for: bulk and
      transactional at the share, critical never) for which they count as healthy;
    - drained providers last: used only when no other provider of the channel can take it.
    A provider's row for the recipient's country and its row for every country both count: the
    worse condition of the two applies (an operator's drain of every country is not undone by the
    detector restoring one), and the country's weight if it has one, else the one for every country."""
    if not states or not hops:
        return hops
    ordered: list[Hop] = []
    start = 0
    probe: bool | None = None  # drawn once per message, the first time a degraded provider is met
    per_country = {provider for provider, country in states if country}
    while start < len(hops):
        end = start + 1
        while end < len(hops) and (hops[end].channel, hops[end].to) == (hops[start].channel, hops[start].to):
            end += 1
        segment = hops[start:end]
        start = end
        # The number is parsed (the costly part) only when one of these providers has a country's row.
        by_country = any(hop.provider in per_country for hop in segment)
        country = recipient_country(segment[0].channel, segment[0].to) if by_country else ""
        found = [(hop, _route_effective(hop.provider, country, states)) for hop in segment]
        if all(state is None for _, state in found):
            ordered += segment
            continue
        if probe is None and any(state and state.condition == _DEGRADED for _, state in found):
            share = probe_share_for(priority, probe_share)
            probe = share > 0 and draw() < share
        first: list[tuple[Hop, RouteState | None]] = []
        degraded: list[Hop] = []
        drained: list[Hop] = []
        for hop, state in found:
            condition = state.condition if state is not None else _HEALTHY
            if condition == _DRAINED:
                drained.append(hop)
            elif condition == _DEGRADED and not probe:
                degraded.append(hop)
            else:
                first.append((hop, state))
        ordered += _weighted_first(first, draw) + degraded + drained
    return ordered


_SEVERITY = {_HEALTHY: 0, _DEGRADED: 1, _DRAINED: 2}


def _route_effective(provider: str, country: str, states: dict[tuple[str, str], RouteState]) -> RouteState | None:
    """The provider's state for this country, its own row and the every-country row combined."""
    everywhere = states.get((provider, ""))
    own = states.get((provider, country)) if country else None
    if own is None or everywhere is None:
        return own or everywhere
    condition = max(own.condition, everywhere.condition, key=lambda c: _SEVERITY.get(c, 0))
    weight = own.weight if own.weight is not None else everywhere.weight
    return RouteState(provider, country, condition, weight)


def _weighted_first(hops: list[tuple[Hop, RouteState | None]], draw: Callable[[], float]) -> list[Hop]:
    """The hops in route order, but for the first place, drawn among those with a weight above 0
    in proportion to their weights (none: route order)."""
    weighted = [(hop, state.weight) for hop, state in hops if state is not None and state.weight]
    in_order = [hop for hop, _ in hops]
    if not weighted:
        return in_order
    point = draw() * sum(weight for _, weight in weighted)
    chosen = weighted[-1][0]
    for hop, weight in weighted:
        if point < weight:
            chosen = hop
            break
        point -= weight
    return [chosen] + [hop for hop in in_order if hop is not chosen]
