"""App config for reconciliation: registers its settings checks and the periodic jobs' heartbeats."""

from django.apps import AppConfig


class ReconciliationConfig(AppConfig):
    name = "reconciliation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from celery.signals import task_postrun, task_prerun

        from reconciliation import checks, heartbeats  # noqa: F401  (checks registers the checks)

        # Every task a worker runs passes here; only those beat schedules are recorded.
        task_prerun.connect(heartbeats.on_task_prerun, weak=False, dispatch_uid="conductor.heartbeat.prerun")
        task_postrun.connect(heartbeats.on_task_postrun, weak=False, dispatch_uid="conductor.heartbeat.postrun")
