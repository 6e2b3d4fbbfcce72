"""Provider classes by name, and one cached adapter instance per process (keeps HTTP pools warm)."""

from __future__ import annotations

from functools import cache

from providers.base import Provider
from providers.conf import provider_config
from providers.twilio import TwilioProvider

PROVIDER_CLASSES: dict[str, type[Provider]] = {
    TwilioProvider.name: TwilioProvider,
}


@cache
def get_provider(name: str) -> Provider:
    try:
        provider_class = PROVIDER_CLASSES[name]
    except KeyError:
        raise LookupError(f"no provider named {name!r}; known: {', '.join(sorted(PROVIDER_CLASSES))}") from None
    return provider_class(provider_config(name))


def reset_provider_cache() -> None:
    """Forget adapter instances (tests that change provider settings call this)."""
    get_provider.cache_clear()
