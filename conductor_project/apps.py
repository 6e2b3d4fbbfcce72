"""The project as an app, so that its wiring check (conductor_project.checks) is registered and its
commands (receipt_intake) found."""

from django.apps import AppConfig


class ConductorProjectConfig(AppConfig):
    name = "conductor_project"

    def ready(self) -> None:
        from conductor_project import checks  # noqa: F401  (registers the check)
