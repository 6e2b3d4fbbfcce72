"""The one accessor for the providers layer's settings: each provider's CONDUCTOR_PROVIDERS entry,
and the keys of settings.CONDUCTOR this layer owns (DEFAULTS; providers.checks rejects bad ones)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

DEFAULTS: dict[str, Any] = {
    # Where providers post receipts (their status callback URLs are built from it).
    "PUBLIC_URL": "http://127.0.0.1:8000",
    # Where providers post receipts when the receipt intake server (manage.py receipt_intake) takes
    # them at a base URL of its own; empty: PUBLIC_URL, the web answers them.
    "RECEIPTS_URL": "",
    # Provider calls in flight at once per worker process (the bulk path's round), and so the
    # keep-alive connections an adapter pools.
    "BULK_SEND_CONCURRENCY": 100,
    # Overrides of providers.circuit.CircuitSettings (field names), for every provider.
    "CIRCUIT_BREAKER": {},
}


# The secrets every provider entry defaults to, which the sandbox checks and signs with. They are
# public (in this repository): a provider pointed anywhere but the sandbox must not keep them, or
# anyone could sign its receipts (conductor.E023). conductor_project.settings uses these values.
SANDBOX_SECRETS: dict[str, dict[str, str]] = {
    "twilio": {"AUTH_TOKEN": "sandbox-twilio-auth-token"},
    "vonage": {"API_SECRET": "sandbox-vonage-secret", "SIGNATURE_SECRET": "sandbox-vonage-signature-secret"},
    "mailgun": {"API_KEY": "sandbox-mailgun-api-key", "WEBHOOK_SIGNING_KEY": "sandbox-mailgun-signing-key"},
}


def providers_setting(name: str) -> Any:
    """A setting of this layer: the project's CONDUCTOR[name] over the default."""
    if name not in DEFAULTS:
        raise KeyError(f"unknown providers setting {name!r}")
    return getattr(settings, "CONDUCTOR", {}).get(name, DEFAULTS[name])


def receipts_base_url() -> str:
    """The base URL providers post receipts to (no trailing slash): RECEIPTS_URL, else PUBLIC_URL."""
    return (providers_setting("RECEIPTS_URL") or providers_setting("PUBLIC_URL")).rstrip("/")


def receipt_base_urls() -> tuple[str, ...]:
    """Every base URL a receipt may have been posted to (a signature over the URL is checked
    against each): the receipts URL first, then the web's, where they differ."""
    public = providers_setting("PUBLIC_URL").rstrip("/")
    receipts = receipts_base_url()
    return (receipts,) if receipts == public else (receipts, public)


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
