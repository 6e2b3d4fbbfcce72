"""App config: registers the system checks that reject bad Conductor settings at start-up."""

from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "messaging"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from messaging import checks, rows  # noqa: F401  (registers the checks and the `any` lookup)
