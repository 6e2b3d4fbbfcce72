"""System checks of the reconciliation layer's settings: the anomaly detector's overrides."""

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
    return [
        Error(f"CONDUCTOR['ANOMALY']: {problem}.", hint="See reconciliation/anomalies.py.", id="conductor.E013")
        for problem in detector_settings_problems(reconciliation_setting("ANOMALY"))
    ]
