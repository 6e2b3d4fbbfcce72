"""System checks of the reconciliation layer's settings: the anomaly detector's overrides, the
callback endpoints' auto-disable delay, when a periodic job counts as overdue."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register

from providers.checks import setting_type_errors
from reconciliation.conf import DEFAULTS, detector_settings_problems, reconciliation_setting


@register()
def check_reconciliation_settings(app_configs=None, **kwargs) -> list[Error]:
    type_errors = setting_type_errors(getattr(settings, "CONDUCTOR", {}), DEFAULTS)
    if type_errors:
        return type_errors
    errors = [
        Error(f"CONDUCTOR['ANOMALY']: {problem}.", hint="See reconciliation/anomalies.py.", id="conductor.E013")
        for problem in detector_settings_problems(reconciliation_setting("ANOMALY"))
    ]
    disable_after = reconciliation_setting("CALLBACK_DISABLE_AFTER_SECONDS")
    if disable_after <= 0:
        errors.append(
            Error(
                f"CONDUCTOR['CALLBACK_DISABLE_AFTER_SECONDS'] is {disable_after!r}; it must be above 0 (seconds).",
                hint="How long a client's callback endpoint may fail before it is disabled.",
                id="conductor.E063",
            )
        )
    retention = reconciliation_setting("CALLBACK_RETENTION_SECONDS")
    if retention <= 0:
        errors.append(
            Error(
                f"CONDUCTOR['CALLBACK_RETENTION_SECONDS'] is {retention!r}; it must be above 0 (seconds).",
                hint="How long delivered status callbacks are kept (CONDUCTOR_CALLBACK_RETENTION_SECONDS).",
                id="conductor.E064",
            )
        )
    overdue_intervals = reconciliation_setting("PERIODIC_JOB_OVERDUE_INTERVALS")
    if overdue_intervals < 1:
        errors.append(
            Error(
                f"CONDUCTOR['PERIODIC_JOB_OVERDUE_INTERVALS'] is {overdue_intervals!r}; it must be at least 1.",
                hint="How many of its intervals a periodic job may miss before it is overdue "
                "(CONDUCTOR_PERIODIC_JOB_OVERDUE_INTERVALS): below one, every job would be overdue between runs.",
                id="conductor.E120",
            )
        )
    grace = reconciliation_setting("PERIODIC_JOB_OVERDUE_GRACE_SECONDS")
    if grace < 0:
        errors.append(
            Error(
                f"CONDUCTOR['PERIODIC_JOB_OVERDUE_GRACE_SECONDS'] is {grace!r}; it must be 0 or more (seconds).",
                hint="Added to the missed intervals before a periodic job is overdue "
                "(CONDUCTOR_PERIODIC_JOB_OVERDUE_GRACE_SECONDS).",
                id="conductor.E121",
            )
        )
    return errors
