"""Queues per channel and priority, and the retry policy (full-jitter exponential backoff)."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields, replace

from django.db import models

from messaging.conf import messaging_setting


class Channel(models.TextChoices):
    SMS = "sms"
    WHATSAPP = "whatsapp"
    EMAIL = "email"


class Priority(models.TextChoices):
    CRITICAL = "critical"
    TRANSACTIONAL = "transactional"
    BULK = "bulk"


class ReplayDeadline(models.TextChoices):
    """What a replay does to a message's deadline when the sender did not set one."""

    KEEP = "keep"  # the original deadline holds: past it, the replay skips the message unless forced
    RENEW = "renew"  # a fresh default deadline (ttl_seconds) from the moment of the replay


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    base_seconds: float
    cap_seconds: float
    ttl_seconds: float  # default deadline after acceptance
    dlq_retention_seconds: float
    # A 2FA code is worthless after its deadline, a shipping notice is not. A deadline the sender
    # gave (expires_at, ttl_seconds) is always kept, whatever this says.
    replay_deadline: str = ReplayDeadline.RENEW


DEFAULT_RETRY_POLICIES: dict[str, RetryPolicy] = {
    Priority.CRITICAL: RetryPolicy(6, 1.0, 10.0, 5 * 60, 24 * 3600, ReplayDeadline.KEEP),
    Priority.TRANSACTIONAL: RetryPolicy(10, 5.0, 600.0, 24 * 3600, 14 * 24 * 3600, ReplayDeadline.RENEW),
    Priority.BULK: RetryPolicy(12, 60.0, 7200.0, 72 * 3600, 30 * 24 * 3600, ReplayDeadline.RENEW),
}
POLICY_FIELDS = frozenset(f.name for f in fields(RetryPolicy))


def queue_name(channel: str, priority: str) -> str:
    """The Celery queue a message's dispatch task goes to, e.g. ``sms.critical``."""
    return f"{channel}.{priority}"


def retry_policy_for(priority: str, category: str = "") -> RetryPolicy:
    """The priority's policy with settings overrides, then the category's overrides on top."""
    policy = DEFAULT_RETRY_POLICIES[priority]
    priority_overrides = messaging_setting("RETRY_POLICIES").get(priority, {})
    policy = replace(policy, **priority_overrides)
    if category:
        policy = replace(policy, **messaging_setting("CATEGORY_POLICIES").get(category, {}))
    return policy


def backoff_delay(policy: RetryPolicy, failures: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next attempt after `failures` failed attempts (full jitter).

    random(0, min(cap, base * 2**n)), n counting from 0 for the first retry.
    """
    exponent = max(0, failures - 1)
    ceiling = min(policy.cap_seconds, policy.base_seconds * (2 ** min(exponent, 62)))
    return (rng or random).uniform(0, ceiling)


@dataclass(frozen=True)
class Hop:
    """One way to send a message: a channel, the address on it, and a provider."""

    channel: str
    to: str
    provider: str


def message_route(*, channel: str, to: str, fallback_channels: list[str], fallback_to: dict[str, str]) -> list[Hop]:
    """Every hop in order: the channel's providers, then each fallback channel's providers."""
    routes = messaging_setting("ROUTES")
    hops = [Hop(channel, to, provider) for provider in routes.get(channel, [])]
    for fallback in fallback_channels:
        address = fallback_to.get(fallback)
        if address:
            hops += [Hop(fallback, address, provider) for provider in routes.get(fallback, [])]
    return hops


def routed_providers() -> frozenset[str]:
    """The providers some route sends through: the only ones whose receipts we take."""
    return frozenset(provider for providers in messaging_setting("ROUTES").values() for provider in providers)
