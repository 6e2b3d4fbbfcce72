"""System checks: a misspelt or inconsistent Conductor setting stops start-up with a clear error."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.checks import Error, Warning, register

from messaging.conf import DEFAULTS
from messaging.routing import POLICY_FIELDS, Channel, Priority, ReplayDeadline


@register()
def check_conductor_settings(app_configs=None, **kwargs) -> list[Error]:
    errors: list[Error] = []
    configured = getattr(settings, "CONDUCTOR", {})
    for name in sorted(set(configured) - set(DEFAULTS)):
        errors.append(
            Error(
                f"Unknown setting CONDUCTOR[{name!r}].",
                hint=f"Known: {', '.join(sorted(DEFAULTS))}.",
                id="conductor.E001",
            )
        )
    routes = configured.get("ROUTES", DEFAULTS["ROUTES"])
    from providers.registry import PROVIDER_CLASSES, provider_class

    for channel, names in routes.items():
        if channel not in Channel.values:
            errors.append(Error(f"CONDUCTOR['ROUTES'] names unknown channel {channel!r}.", id="conductor.E002"))
        for name in names:
            if name not in PROVIDER_CLASSES:
                errors.append(
                    Error(
                        f"CONDUCTOR['ROUTES'][{channel!r}] names unknown provider {name!r}.",
                        hint=f"Known: {', '.join(sorted(PROVIDER_CLASSES))}.",
                        id="conductor.E003",
                    )
                )
            elif channel in Channel.values and channel not in provider_class(name).channels:
                errors.append(
                    Error(
                        f"CONDUCTOR['ROUTES'][{channel!r}] names {name!r}, which does not send {channel}.",
                        id="conductor.E011",
                    )
                )
            elif name not in getattr(settings, "CONDUCTOR_PROVIDERS", {}):
                errors.append(
                    Error(f"Provider {name!r} is routed to but has no CONDUCTOR_PROVIDERS entry.", id="conductor.E004")
                )
    for priority, overrides in configured.get("RETRY_POLICIES", {}).items():
        if priority not in Priority.values:
            errors.append(
                Error(f"CONDUCTOR['RETRY_POLICIES'] names unknown priority {priority!r}.", id="conductor.E005")
            )
        for field in set(overrides) - POLICY_FIELDS:
            errors.append(
                Error(
                    f"Unknown retry policy field {field!r} for {priority!r}.",
                    hint=f"Known: {', '.join(sorted(POLICY_FIELDS))}.",
                    id="conductor.E006",
                )
            )
    for category, overrides in configured.get("CATEGORY_POLICIES", {}).items():
        for field in set(overrides) - POLICY_FIELDS:
            errors.append(
                Error(f"Unknown retry policy field {field!r} for category {category!r}.", id="conductor.E007")
            )
    policy_blocks = {
        **{f"RETRY_POLICIES[{p!r}]": o for p, o in configured.get("RETRY_POLICIES", {}).items()},
        **{f"CATEGORY_POLICIES[{c!r}]": o for c, o in configured.get("CATEGORY_POLICIES", {}).items()},
    }
    for where, overrides in policy_blocks.items():
        value = overrides.get("replay_deadline", ReplayDeadline.KEEP)
        if value not in ReplayDeadline.values:
            errors.append(
                Error(
                    f"CONDUCTOR[{where}]['replay_deadline'] is {value!r}.",
                    hint=f"Use one of: {', '.join(ReplayDeadline.values)}.",
                    id="conductor.E012",
                )
            )
    errors += _check_circuit_settings()
    errors += _check_receipt_settings(configured)
    errors += _check_ordering_settings(configured)
    lease = configured.get("DISPATCH_LEASE_SECONDS", DEFAULTS["DISPATCH_LEASE_SECONDS"])
    for name, conf in getattr(settings, "CONDUCTOR_PROVIDERS", {}).items():
        timeout = conf.get("TIMEOUT_SECONDS", 0)
        if timeout * 2 > lease:
            errors.append(
                Error(
                    f"DISPATCH_LEASE_SECONDS ({lease}) must be at least twice "
                    f"provider {name!r}'s TIMEOUT_SECONDS ({timeout}).",
                    hint="Otherwise a slow send could be taken for a dead worker and looked up while still in flight.",
                    id="conductor.E008",
                )
            )
    return errors


def _check_ordering_settings(configured: dict) -> list[Error]:
    from messaging.models import OrderingMode

    errors = []
    policy = configured.get("ORDERING_DEAD_PREDECESSOR", DEFAULTS["ORDERING_DEAD_PREDECESSOR"])
    if policy not in ("proceed", "hold"):
        errors.append(
            Error(
                f"CONDUCTOR['ORDERING_DEAD_PREDECESSOR'] is {policy!r}.",
                hint="Use proceed or hold.",
                id="conductor.E015",
            )
        )
    for category, mode in configured.get("CATEGORY_ORDERING", {}).items():
        if mode not in OrderingMode.values:
            errors.append(
                Error(
                    f"CONDUCTOR['CATEGORY_ORDERING'][{category!r}] is {mode!r}.",
                    hint=f"Use one of: {', '.join(OrderingMode.values)}.",
                    id="conductor.E016",
                )
            )
    if configured.get("ORDERING_RECEIPT_TIMEOUT_SECONDS", 1.0) <= 0:
        errors.append(Error("CONDUCTOR['ORDERING_RECEIPT_TIMEOUT_SECONDS'] must be positive.", id="conductor.E017"))
    for name in ("BULK_BATCH_SIZE", "BULK_SEND_CONCURRENCY"):
        value = configured.get(name, DEFAULTS[name])
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            errors.append(
                Error(f"CONDUCTOR[{name!r}] is {value!r}; it must be a whole number >= 1.", id="conductor.E018")
            )
    return errors


def _check_circuit_settings() -> list[Error]:
    from providers.guards import CIRCUIT_FIELDS, circuit_settings

    errors: list[Error] = []
    blocks = {"CONDUCTOR['CIRCUIT_BREAKER']": getattr(settings, "CONDUCTOR", {}).get("CIRCUIT_BREAKER", {})}
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
        try:
            circuit_settings(name)
        except (TypeError, ValueError) as exc:
            errors.append(Error(f"Circuit breaker settings for {name!r} cannot work: {exc}", id="conductor.E010"))
    return errors


def _check_receipt_settings(configured: dict) -> list[Error]:
    from reconciliation.conf import detector_settings_problems

    errors = [
        Error(f"CONDUCTOR['ANOMALY']: {problem}.", hint="See reconciliation/anomalies.py.", id="conductor.E013")
        for problem in detector_settings_problems(configured.get("ANOMALY", {}))
    ]
    for channel, seconds in configured.get("RECEIPT_TIMEOUT_SECONDS", {}).items():
        if channel not in Channel.values or not isinstance(seconds, int | float) or seconds <= 0:
            errors.append(
                Error(
                    f"CONDUCTOR['RECEIPT_TIMEOUT_SECONDS'][{channel!r}] = {seconds!r} cannot work.",
                    hint=f"Channels: {', '.join(Channel.values)}; timeouts in seconds, above 0.",
                    id="conductor.E014",
                )
            )
    return errors


@register(deploy=True)
def check_metrics_directory(app_configs=None, **kwargs) -> list[Warning]:
    """Without a shared multiprocess directory /metrics shows one web process's events only."""
    directory = getattr(settings, "PROMETHEUS_MULTIPROC_DIR", None)
    if directory and os.path.isdir(directory) and os.access(directory, os.W_OK):
        return []
    problem = "is not set" if not directory else f"names {directory!r}, which is not a writable directory"
    return [
        Warning(
            f"PROMETHEUS_MULTIPROC_DIR {problem}: /metrics will show only the answering web process's "
            "own latency and error counts, not the workers'.",
            hint="Set it to the same empty directory in the environment of web, worker and beat processes "
            "(make run and docker/compose.yml do).",
            id="conductor.W001",
        )
    ]
