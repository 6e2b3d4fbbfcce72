"""Provider classes by name, their settings, and one cached adapter instance per process (keeps HTTP
pools warm)."""

from __future__ import annotations

from typing import Any

from django.utils.module_loading import import_string

from providers.base import Provider
from providers.conf import provider_config

# Imported on first use, so a process only loads the SDKs of the providers it routes to.
PROVIDER_CLASSES: dict[str, str] = {
    "twilio": "providers.twilio.TwilioProvider",
    "vonage": "providers.vonage.VonageProvider",
    "mailgun": "providers.mailgun.MailgunProvider",
    "smtp": "providers.smtp.SmtpProvider",
}


def provider_class(name: str) -> type[Provider]:
    try:
        return import_string(PROVIDER_CLASSES[name])
    except KeyError:
        raise LookupError(f"no provider named {name!r}; known: {', '.join(sorted(PROVIDER_CLASSES))}") from None


def provider_setting(name: str, key: str) -> Any:
    """One key of a provider's CONDUCTOR_PROVIDERS entry, or the default its class declares; a key
    the class does not declare is a KeyError (the settings check rejects such keys at start-up)."""
    return provider_class(name).setting_of(provider_config(name), key)


_adapters: dict[str, Provider] = {}


def get_provider(name: str) -> Provider:
    adapter = _adapters.get(name)
    if adapter is None:
        # Two threads may both build one on first use; either is fine, one is kept.
        adapter = _adapters.setdefault(name, provider_class(name)(provider_config(name)))
    return adapter


def reset_provider_cache() -> None:
    """Forget adapter instances, closing their connections (tests that change provider settings)."""
    while _adapters:
        _adapters.popitem()[1].close()
