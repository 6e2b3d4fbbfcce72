"""App config: registers the system checks, the `any` lookup and anymail's tracking receiver."""

from django.apps import AppConfig


class MessagingConfig(AppConfig):
    name = "messaging"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported for their side effects: check registration, the lookup, the signal receiver.
        from messaging import checks, receipts, rows  # noqa: F401
