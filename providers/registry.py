"""Provider classes by name, and one cached adapter instance per process (keeps HTTP pools warm)."""

from __future__ import annotations

from functools import cache

from django.utils.module_loading import import_string

from providers.base import Provider
from providers.conf import provider_config

# Imported on first use, so a process only loads the SDKs of the providers it routes to.
PROVIDER_CLASSES: dict[str, str] = {
    "twilio": "providers.twilio.TwilioProvider",
    "vonage": "providers.vonage.VonageProvider",
    "mailgun": "providers.anymail_email.MailgunProvider",
    "smtp": "providers.smtp.SmtpProvider",
}


def provider_class(name: str) -> type[Provider]:
    try:
        return import_string(PROVIDER_CLASSES[name])
    except KeyError:
        raise LookupError(f"no provider named {name!r}; known: {', '.join(sorted(PROVIDER_CLASSES))}") from None


@cache
def get_provider(name: str) -> Provider:
    return provider_class(name)(provider_config(name))


def reset_provider_cache() -> None:
    """Forget adapter instances (tests that change provider settings call this)."""
    get_provider.cache_clear()
