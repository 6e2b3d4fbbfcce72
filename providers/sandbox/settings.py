"""The sandbox's credentials, taken from the same settings the adapters use."""

from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from providers.conf import provider_config, providers_setting, receipts_base_url
from providers.sandbox.state import DEFAULT_DELIVERY_DELAY_MS, SandboxConfig


def sandbox_config_from_settings(seed: int | None = None, *, callback_process: bool = True) -> SandboxConfig:
    twilio, vonage, mailgun = provider_config("twilio"), provider_config("vonage"), provider_config("mailgun")
    delivery_delay_ms = float(getattr(settings, "SANDBOX_DELIVERY_DELAY_MS", DEFAULT_DELIVERY_DELAY_MS))
    if not delivery_delay_ms >= 0:
        raise ImproperlyConfigured("SANDBOX_DELIVERY_DELAY_MS (CONDUCTOR_SANDBOX_DELIVERY_DELAY_MS) must be >= 0")
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
        public_url=receipts_base_url(),  # where account-level webhooks (Mailgun's) post
        twilio_from_number=twilio["FROM_NUMBER"],
        twilio_whatsapp_from=twilio["WHATSAPP_FROM"],
        vonage_from=vonage["FROM"],
        inbound_base_url=providers_setting("PUBLIC_URL"),  # inbound messages go to the web
        callback_process=callback_process,
        delivery_delay_ms=delivery_delay_ms,
    )
