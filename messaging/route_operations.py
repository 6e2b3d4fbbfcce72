"""What an operator does with routes by hand (admin, `manage.py routes`, the API): check the
input, preview a change (dry run) or make it through provider_route_set, and the reads they see."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import phonenumbers
from django.db.models import QuerySet

from messaging.models import ProviderRoute, RouteCondition, RoutingChange
from messaging.route_health import UNSET, _Unset, provider_route_set
from messaging.routing import routed_providers

# A weight is a share among a handful of providers: 1000 leaves room for per-mille splits.
WEIGHT_MAX = 1000
REASON_MAX_LENGTH = 300


class RouteInputError(ValueError):
    """Bad operator input, naming the field (the API's 400, the command's error, the admin form's)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class RouteChangeResult:
    provider: str
    country: str
    from_condition: str
    to_condition: str
    from_weight: int | None
    to_weight: int | None
    changed: bool  # False: it already was so (or a dry run would change nothing)
    dry_run: bool
    change_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = f"{self.provider}{f' ({self.country})' if self.country else ' (every country)'}"
        if not self.changed:
            return f"{where}: unchanged ({self.to_condition}, weight {_weight(self.to_weight)})"
        verb = "would change" if self.dry_run else "changed"
        return (
            f"{where}: {verb} {self.from_condition} -> {self.to_condition}, "
            f"weight {_weight(self.from_weight)} -> {_weight(self.to_weight)}"
        )


def _weight(weight: int | None) -> str:
    return "none" if weight is None else str(weight)


def route_provider_valid(provider: str) -> str:
    """A provider some route sends through (a drain of anything else would change nothing)."""
    known = routed_providers()
    if provider not in known:
        raise RouteInputError("provider", f"Unknown provider {provider!r}; routed: {', '.join(sorted(known))}.")
    return provider


def route_country_valid(country: str) -> str:
    """An ISO 3166-1 alpha-2 region phonenumbers knows (US, GB), upper-cased; "" for every country."""
    country = (country or "").strip().upper()
    if country and country not in phonenumbers.SUPPORTED_REGIONS:
        raise RouteInputError(
            "country", f"{country!r} is not a country code of phone numbers (ISO 3166-1 alpha-2, e.g. US, GB)."
        )
    return country


def route_change_by_operator(
    *,
    provider: str,
    country: str = "",
    condition: str | None = None,
    weight: int | None | _Unset = UNSET,
    reason: str,
    operator: str,
    dry_run: bool = False,
) -> RouteChangeResult:
    """Check an operator's change and make it (source "operator:<name>", through
    provider_route_set), or with dry_run say what it would change and write nothing."""
    provider = route_provider_valid(provider)
    country = route_country_valid(country)
    if condition is not None and condition not in RouteCondition.values:
        raise RouteInputError("condition", f"Must be one of {', '.join(RouteCondition.values)}.")
    if not isinstance(weight, _Unset) and weight is not None and not 0 <= weight <= WEIGHT_MAX:
        raise RouteInputError("weight", f"Must be a whole number from 0 to {WEIGHT_MAX}, or none.")
    if condition is None and isinstance(weight, _Unset):
        raise RouteInputError("condition", "Give a condition or a weight to change.")
    reason = (reason or "").strip()
    if not reason:
        raise RouteInputError("reason", "Say why (it is kept with the change and shown on the dashboard).")
    if len(reason) > REASON_MAX_LENGTH:
        raise RouteInputError("reason", f"At most {REASON_MAX_LENGTH} characters.")
    current = ProviderRoute.objects.filter(provider=provider, country=country).first()
    from_condition = current.condition if current else RouteCondition.HEALTHY
    from_weight = current.weight if current else None
    to_condition = condition if condition is not None else from_condition
    to_weight = from_weight if isinstance(weight, _Unset) else weight
    result = RouteChangeResult(
        provider=provider,
        country=country,
        from_condition=from_condition,
        to_condition=to_condition,
        from_weight=from_weight,
        to_weight=to_weight,
        changed=(to_condition, to_weight) != (from_condition, from_weight),
        dry_run=dry_run,
    )
    if dry_run or not result.changed:
        return result
    change = provider_route_set(
        provider=provider,
        country=country,
        condition=condition,
        weight=weight,
        reason=reason,
        source=f"operator:{operator}",
    )
    if change is None:  # someone else made the same change in between
        return RouteChangeResult(**{**result.as_dict(), "changed": False})
    return RouteChangeResult(
        provider=provider,
        country=country,
        from_condition=change.from_condition,
        to_condition=change.to_condition,
        from_weight=change.from_weight,
        to_weight=change.to_weight,
        changed=True,
        dry_run=False,
        change_id=change.pk,
    )


def routes_listed() -> QuerySet[ProviderRoute]:
    """Every provider route row (a provider without one is healthy, in route order)."""
    return ProviderRoute.objects.order_by("provider", "country")


def routes_not_healthy() -> QuerySet[ProviderRoute]:
    return ProviderRoute.objects.exclude(condition=RouteCondition.HEALTHY).order_by("provider", "country")


def routing_changes_recent(*, limit: int = 20) -> QuerySet[RoutingChange]:
    return RoutingChange.objects.order_by("-created_at", "-pk")[:limit]


def route_row(route: ProviderRoute) -> dict[str, Any]:
    return {
        "provider": route.provider,
        "country": route.country,
        "condition": route.condition,
        "weight": route.weight,
        "reason": route.reason,
        "source": route.source,
        "changed_at": route.changed_at.isoformat(),
    }


def routing_change_row(change: RoutingChange) -> dict[str, Any]:
    return {
        "id": change.pk,
        "created_at": change.created_at.isoformat(),
        "provider": change.provider,
        "country": change.country,
        "from_condition": change.from_condition,
        "to_condition": change.to_condition,
        "from_weight": change.from_weight,
        "to_weight": change.to_weight,
        "source": change.source,
        "reason": change.reason,
    }
