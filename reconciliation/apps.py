"""App config for reconciliation: registers its settings checks."""

from django.apps import AppConfig


class ReconciliationConfig(AppConfig):
    name = "reconciliation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from reconciliation import checks  # noqa: F401  (registers the checks)
