"""The check only the wiring can make: every key of settings.CONDUCTOR belongs to one layer's schema."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register

from messaging.conf import DEFAULTS as MESSAGING_DEFAULTS
from providers.conf import DEFAULTS as PROVIDERS_DEFAULTS
from reconciliation.conf import DEFAULTS as RECONCILIATION_DEFAULTS

KNOWN_KEYS = frozenset(PROVIDERS_DEFAULTS) | frozenset(MESSAGING_DEFAULTS) | frozenset(RECONCILIATION_DEFAULTS)


@register()
def check_conductor_keys(app_configs=None, **kwargs) -> list[Error]:
    """A misspelt key would otherwise be silently ignored (each layer reads only its own)."""
    return [
        Error(
            f"Unknown setting CONDUCTOR[{name!r}].",
            hint=f"Known: {', '.join(sorted(KNOWN_KEYS))}.",
            id="conductor.E001",
        )
        for name in sorted(set(getattr(settings, "CONDUCTOR", {})) - KNOWN_KEYS)
    ]


def refuse_to_start_on_errors(process: str) -> None:
    """Run the system checks as `manage.py check` does and stop this process (gunicorn, a Celery
    worker or beat, which Django does not check) on any error: a deployment that would take
    forged receipts (conductor.E023) or misread its settings must not start and look healthy."""
    from django.core.checks import run_checks
    from django.core.management.base import SystemCheckError

    errors = [message for message in run_checks() if message.is_serious()]
    if errors:
        listed = "\n".join(f"  {message}" for message in errors)
        raise SystemCheckError(f"{process} refuses to start; `manage.py check` explains:\n{listed}")
