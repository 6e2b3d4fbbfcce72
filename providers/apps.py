"""App config for provider adapters (holds the run_sandbox_provider command)."""

from django.apps import AppConfig


class ProvidersConfig(AppConfig):
    name = "providers"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Connects the receiver of anymail's tracking signal, so /webhooks/anymail/<esp>/tracking/
        # stores receipts even in a process that has not sent an email yet.
        import providers.anymail_email  # noqa: F401
