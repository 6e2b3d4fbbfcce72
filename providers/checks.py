"""System checks of the providers layer's settings: each provider's entry against its class's
settings schema, circuit breaker blocks, send concurrency, webhook replay windows, no sandbox secret
outside the sandbox; and the type check every layer runs over its own CONDUCTOR keys."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from providers.base import REQUIRED
from providers.conf import DEFAULTS, SANDBOX_SECRETS, providers_setting
from providers.guards import CIRCUIT_FIELDS, circuit_settings
from providers.registry import PROVIDER_CLASSES, provider_class


@register()
def check_providers_settings(app_configs=None, **kwargs) -> list[Error]:
    type_errors = setting_type_errors(getattr(settings, "CONDUCTOR", {}), DEFAULTS)
    return (
        _check_provider_entries()
        + (type_errors or _check_circuit_settings())
        + _check_webhook_windows()
        + _check_sandbox_secrets()
    )


def setting_type_errors(configured: dict[str, Any], defaults: dict[str, Any]) -> list[Error]:
    """The type check of one layer's CONDUCTOR keys, against their defaults: a whole number >= 1
    where the default is one (conductor.E018: sizes, counts, concurrency), else the default's type
    (conductor.E021: a number for seconds, a dict, a list; a string where the default is None)."""
    errors = []
    for name, default in defaults.items():
        if name not in configured:
            continue
        value = configured[name]
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(
                    Error(f"CONDUCTOR[{name!r}] is {value!r}; it must be a whole number >= 1.", id="conductor.E018")
                )
            continue
        expected: tuple[type, ...] = (
            (str, type(None)) if default is None else (int, float) if isinstance(default, float) else (type(default),)
        )
        if isinstance(value, bool) is not isinstance(default, bool) or not isinstance(value, expected):
            errors.append(
                Error(
                    f"CONDUCTOR[{name!r}] is {value!r}; expected {' or '.join(t.__name__ for t in expected)}.",
                    id="conductor.E021",
                )
            )
    return errors


def _check_provider_entries() -> list[Error]:
    """conductor.E019 for a key the provider's class does not declare (a misspelt key would be
    silently ignored), conductor.E020 for a required key the entry lacks."""
    errors: list[Error] = []
    for name, conf in getattr(settings, "CONDUCTOR_PROVIDERS", {}).items():
        if name not in PROVIDER_CLASSES:
            continue  # routes naming it are conductor.E003
        schema = provider_class(name).settings_schema
        for key in sorted(set(conf) - set(schema)):
            errors.append(
                Error(
                    f"Unknown setting {key!r} in CONDUCTOR_PROVIDERS[{name!r}].",
                    hint=f"Known: {', '.join(sorted(schema))}.",
                    id="conductor.E019",
                )
            )
        for key in sorted(key for key, default in schema.items() if default is REQUIRED and key not in conf):
            errors.append(Error(f"CONDUCTOR_PROVIDERS[{name!r}] lacks the required {key!r}.", id="conductor.E020"))
    return errors


def _check_circuit_settings() -> list[Error]:
    errors: list[Error] = []
    blocks = {"CONDUCTOR['CIRCUIT_BREAKER']": providers_setting("CIRCUIT_BREAKER")}
    for name, conf in getattr(settings, "CONDUCTOR_PROVIDERS", {}).items():
        blocks[f"CONDUCTOR_PROVIDERS[{name!r}]['CIRCUIT_BREAKER']"] = conf.get("CIRCUIT_BREAKER", {})
    for where, block in blocks.items():
        for field in sorted(set(block) - CIRCUIT_FIELDS):
            errors.append(
                Error(
                    f"Unknown circuit breaker setting {field!r} in {where}.",
                    hint=f"Known: {', '.join(sorted(CIRCUIT_FIELDS))}.",
                    id="conductor.E009",
                )
            )
    if errors:
        return errors
    for name in getattr(settings, "CONDUCTOR_PROVIDERS", {}):
        if name not in PROVIDER_CLASSES:
            continue
        try:
            circuit_settings(name)
        except (TypeError, ValueError) as exc:
            errors.append(Error(f"Circuit breaker settings for {name!r} cannot work: {exc}", id="conductor.E010"))
    return errors


def _check_webhook_windows() -> list[Error]:
    """conductor.E022: a webhook replay window (WEBHOOK_MAX_AGE_SECONDS) that is not a positive
    number would refuse every webhook, or none."""
    errors: list[Error] = []
    for name, conf in getattr(settings, "CONDUCTOR_PROVIDERS", {}).items():
        if name not in PROVIDER_CLASSES or "WEBHOOK_MAX_AGE_SECONDS" not in conf:
            continue
        value = conf["WEBHOOK_MAX_AGE_SECONDS"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            errors.append(
                Error(
                    f"CONDUCTOR_PROVIDERS[{name!r}]['WEBHOOK_MAX_AGE_SECONDS'] is {value!r}; "
                    "it must be a number of seconds > 0.",
                    id="conductor.E022",
                )
            )
    return errors


def _check_sandbox_secrets() -> list[Error]:
    """conductor.E023: a provider whose BASE_URL is not the sandbox's (settings.SANDBOX_URL) but
    which still has one of the sandbox's secrets (public, in this repository): anyone could sign
    its receipts, so start-up stops (manage.py check, migrate) naming the setting."""
    sandbox = str(getattr(settings, "SANDBOX_URL", "") or "").rstrip("/")
    errors: list[Error] = []
    for name, conf in getattr(settings, "CONDUCTOR_PROVIDERS", {}).items():
        base_url = str(conf.get("BASE_URL") or "").rstrip("/")
        if sandbox and base_url == sandbox:
            continue
        where = repr(base_url) if base_url else f"empty (the real {name})"
        for key, default in SANDBOX_SECRETS.get(name, {}).items():
            if conf.get(key) == default:
                errors.append(
                    Error(
                        f"CONDUCTOR_PROVIDERS[{name!r}][{key!r}] is still the sandbox's default, but the "
                        f"provider's BASE_URL is {where}, not the sandbox ({sandbox!r}).",
                        hint=f"Set {name.upper()}_{key} to the provider's own secret (or point {name.upper()}_BASE_URL "
                        "at the sandbox).",
                        id="conductor.E023",
                    )
                )
    return errors
