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


def sandbox_config_from_settings(seed: int | None = None):
    """The sandbox's credentials, taken from the same settings the adapters use."""
    from messaging.conf import conductor_setting
    from providers.sandbox.state import SandboxConfig

    twilio, vonage, mailgun = provider_config("twilio"), provider_config("vonage"), provider_config("mailgun")
    return SandboxConfig(
        twilio_account_sid=twilio["ACCOUNT_SID"],
        twilio_auth_token=twilio["AUTH_TOKEN"],
        seed=seed,
        vonage_api_key=vonage["API_KEY"],
        vonage_api_secret=vonage["API_SECRET"],
        vonage_signature_secret=vonage["SIGNATURE_SECRET"],
        vonage_signature_method=vonage["SIGNATURE_METHOD"],
        mailgun_api_key=mailgun["API_KEY"],
        mailgun_domain=mailgun["DOMAIN"],
        mailgun_webhook_signing_key=mailgun["WEBHOOK_SIGNING_KEY"],
        public_url=conductor_setting("PUBLIC_URL"),
    )
