"""App config for provider adapters: registers their settings checks (and holds run_sandbox_provider)."""

from django.apps import AppConfig


class ProvidersConfig(AppConfig):
    name = "providers"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from providers import checks  # noqa: F401  (registers the checks)
