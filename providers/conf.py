"""The one accessor for provider settings (settings.CONDUCTOR_PROVIDERS)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def provider_config(name: str) -> dict[str, Any]:
    """The settings block of one provider, with a clear error when it is missing."""
    providers = getattr(settings, "CONDUCTOR_PROVIDERS", {})
    try:
        return providers[name]
    except KeyError:
        raise ImproperlyConfigured(
            f"Provider {name!r} is routed to but has no entry in settings.CONDUCTOR_PROVIDERS."
        ) from None


def configured_provider_names() -> list[str]:
    return list(getattr(settings, "CONDUCTOR_PROVIDERS", {}))
