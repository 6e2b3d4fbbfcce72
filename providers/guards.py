"""One circuit breaker and one rate limiter per provider and process, built from settings."""

from __future__ import annotations

from dataclasses import fields, replace
from functools import cache
from typing import Any

from providers.circuit import CircuitBreaker, CircuitSettings
from providers.conf import providers_setting
from providers.ratelimit import RateLimit, RateLimiter
from providers.registry import provider_setting

CIRCUIT_FIELDS = frozenset(f.name for f in fields(CircuitSettings))


def circuit_settings(name: str) -> CircuitSettings:
    """Defaults, then CONDUCTOR["CIRCUIT_BREAKER"], then the provider's own "CIRCUIT_BREAKER"."""
    overrides: dict[str, Any] = {**providers_setting("CIRCUIT_BREAKER")}
    overrides.update(provider_setting(name, "CIRCUIT_BREAKER"))
    return replace(CircuitSettings(), **overrides)


def rate_limit(name: str) -> RateLimit:
    return RateLimit(
        per_second=provider_setting(name, "RATE_LIMIT_PER_SECOND") or None,
        # A burst of 1 spaces sends evenly, so no one-second window exceeds the rate (+1): what a
        # provider's "N messages per second" cap checks. Raise it only for providers that allow bursts.
        burst=provider_setting(name, "RATE_LIMIT_BURST") or 1,
        max_inline_wait_seconds=provider_setting(name, "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS"),
    )


@cache
def circuit_breaker(name: str) -> CircuitBreaker:
    return CircuitBreaker(name, circuit_settings(name))


@cache
def rate_limiter(name: str) -> RateLimiter:
    return RateLimiter(name, rate_limit(name))


def seconds_until_half_open(name: str) -> float:
    """How long until an open circuit lets a trial through (0 when it is not open)."""
    breaker = circuit_breaker(name)
    snapshot = breaker.snapshot()
    if snapshot.get("state") != "open" or not snapshot.get("opened_at"):
        return 0.0
    return max(0.0, snapshot["opened_at"] + breaker.settings.open_seconds - breaker.clock())


def reset_guards() -> None:
    """Forget breaker and limiter instances (tests that change their settings call this)."""
    circuit_breaker.cache_clear()
    rate_limiter.cache_clear()
