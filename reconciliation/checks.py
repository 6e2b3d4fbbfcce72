"""System checks of the reconciliation layer's settings: the anomaly detector's overrides."""

from __future__ import annotations

from django.core.checks import Error, register

from reconciliation.conf import detector_settings_problems, reconciliation_setting


@register()
def check_reconciliation_settings(app_configs=None, **kwargs) -> list[Error]:
    return [
        Error(f"CONDUCTOR['ANOMALY']: {problem}.", hint="See reconciliation/anomalies.py.", id="conductor.E013")
        for problem in detector_settings_problems(reconciliation_setting("ANOMALY"))
    ]
