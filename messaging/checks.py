"""System checks: a misspelt or inconsistent messaging setting stops start-up with a clear error."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.core.exceptions import ValidationError

from messaging.conf import DEFAULTS
from messaging.models import OrderingMode, validate_api_rate, validate_priorities
from messaging.quiet_hours import QuietHoursError, parse_config, parse_priorities
from messaging.routing import POLICY_FIELDS, Channel, Priority, ReplayDeadline
from providers.checks import setting_type_errors
from providers.registry import PROVIDER_CLASSES, provider_class


@register()
def check_messaging_settings(app_configs=None, **kwargs) -> list[Error]:
    configured = getattr(settings, "CONDUCTOR", {})
    errors: list[Error] = setting_type_errors(configured, DEFAULTS)
    if errors:  # the checks below read these values
        return errors
    routes = configured.get("ROUTES", DEFAULTS["ROUTES"])
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
    errors += _check_receipt_settings(configured)
    errors += _check_limit_settings(configured)
    errors += _check_ordering_settings(configured)
    errors += _check_callback_settings(configured)
    errors += _check_help_reply(configured)
    errors += _check_quiet_hours(configured)
    errors += _check_whatsapp_session_window(configured)
    errors += _check_silence_fallback(configured)
    errors += _check_route_probe_share(configured)
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


def _check_silence_fallback(configured: dict) -> list[Error]:
    """SILENCE_FALLBACK (messaging.silence): categories with a positive after_seconds and nothing else;
    a misspelt key would silently keep the default (no fallback) for a 2FA code."""
    errors = []
    hint = 'E.g. {"otp": {"after_seconds": 60}}; categories as messages name them, seconds above 0.'
    for category, policy in configured.get("SILENCE_FALLBACK", DEFAULTS["SILENCE_FALLBACK"]).items():
        unknown = set(policy) - {"after_seconds"} if isinstance(policy, dict) else set()
        seconds = policy.get("after_seconds") if isinstance(policy, dict) else None
        valid_seconds = isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds > 0
        if not category or unknown or not valid_seconds:
            errors.append(
                Error(
                    f"CONDUCTOR['SILENCE_FALLBACK'][{category!r}] = {policy!r} cannot work"
                    + (f" (unknown {', '.join(sorted(unknown))})" if unknown else "")
                    + ".",
                    hint=hint,
                    id="conductor.E100",
                )
            )
    return errors


def _check_help_reply(configured: dict) -> list[Error]:
    """The HELP answer is one SMS body: longer than an SMS may be, it could never be sent."""
    reply = configured.get("SMS_HELP_REPLY", DEFAULTS["SMS_HELP_REPLY"])
    limit = configured.get("BODY_MAX_LENGTH", DEFAULTS["BODY_MAX_LENGTH"]).get("sms", 1600)
    if len(reply) > limit:
        return [
            Error(
                f"CONDUCTOR['SMS_HELP_REPLY'] is {len(reply)} characters long; an SMS body is at most {limit}.",
                hint="Shorten it (carriers expect a sentence or two: who sends, how to opt out).",
                id="conductor.E080",
            )
        ]
    return []


def _check_quiet_hours(configured: dict) -> list[Error]:
    """Quiet hours (messaging.quiet_hours) that cannot be read would keep none at all: refused."""
    errors = []
    try:
        parse_config(configured.get("QUIET_HOURS", DEFAULTS["QUIET_HOURS"]), "CONDUCTOR['QUIET_HOURS']")
    except QuietHoursError as exc:
        errors.append(
            Error(
                str(exc),
                hint='E.g. {"default": {"start": "21:00", "end": "08:00"}, "otp": None}; a window may add '
                '"exempt_priorities": [] to hold critical messages too.',
                id="conductor.E090",
            )
        )
    exempt = configured.get("QUIET_HOURS_EXEMPT_PRIORITIES", DEFAULTS["QUIET_HOURS_EXEMPT_PRIORITIES"])
    try:
        parse_priorities(exempt, "CONDUCTOR['QUIET_HOURS_EXEMPT_PRIORITIES']")
    except QuietHoursError as exc:
        errors.append(Error(str(exc), id="conductor.E091"))
    return errors


def _check_whatsapp_session_window(configured: dict) -> list[Error]:
    """The window is a number of hours, 0 (not enforced) to 24: Meta's window is 24 hours, so a
    longer one here would send free-form messages Twilio then fails with 63016."""
    hours = configured.get("WHATSAPP_SESSION_WINDOW_HOURS", DEFAULTS["WHATSAPP_SESSION_WINDOW_HOURS"])
    if isinstance(hours, bool) or not isinstance(hours, (int, float)) or not 0 <= hours <= 24:
        return [
            Error(
                f"CONDUCTOR['WHATSAPP_SESSION_WINDOW_HOURS'] is {hours!r}.",
                hint="Use a number of hours from 0 (not enforced) to 24 (WhatsApp's window).",
                id="conductor.E081",
            )
        ]
    return []


def _check_route_probe_share(configured: dict) -> list[Error]:
    """A share of messages: 0 (a degraded provider gets nothing until restored) to 1."""
    share = configured.get("ROUTE_PROBE_SHARE", DEFAULTS["ROUTE_PROBE_SHARE"])
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        return [
            Error(
                f"CONDUCTOR['ROUTE_PROBE_SHARE'] is {share!r}.",
                hint="A share from 0 (no probes: a degraded provider waits for an operator) to 1 (docs/routing.md).",
                id="conductor.E101",
            )
        ]
    return []


def _check_ordering_settings(configured: dict) -> list[Error]:
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
    return errors


CALLBACK_SECONDS_KEYS = (
    "CALLBACK_TIMEOUT_SECONDS",
    "CALLBACK_RETRY_WINDOW_SECONDS",
    "CALLBACK_BACKOFF_BASE_SECONDS",
    "CALLBACK_BACKOFF_MAX_SECONDS",
    "CALLBACK_LEASE_SECONDS",
    "CALLBACK_SECRET_OVERLAP_SECONDS",
)


def _check_callback_settings(configured: dict) -> list[Error]:
    """Status callback delivery (messaging.callbacks) must be able to work as set: times positive
    (conductor.E060), a lease outlasting two requests (E061), backoff base within its maximum (E062),
    per-endpoint concurrency within the total (E071)."""
    values = {name: configured.get(name, DEFAULTS[name]) for name in CALLBACK_SECONDS_KEYS}
    errors = [
        Error(f"CONDUCTOR[{name!r}] is {value!r}; it must be above 0 (seconds).", id="conductor.E060")
        for name, value in values.items()
        if value <= 0
    ]
    if errors:
        return errors
    timeout, lease = values["CALLBACK_TIMEOUT_SECONDS"], values["CALLBACK_LEASE_SECONDS"]
    if lease < 2 * timeout:
        errors.append(
            Error(
                f"CALLBACK_LEASE_SECONDS ({lease}) must be at least twice CALLBACK_TIMEOUT_SECONDS ({timeout}).",
                hint="Otherwise a callback still in flight could be taken for a dead worker's and sent twice at once.",
                id="conductor.E061",
            )
        )
    if values["CALLBACK_BACKOFF_BASE_SECONDS"] > values["CALLBACK_BACKOFF_MAX_SECONDS"]:
        errors.append(
            Error(
                "CALLBACK_BACKOFF_BASE_SECONDS must not be above CALLBACK_BACKOFF_MAX_SECONDS.",
                id="conductor.E062",
            )
        )
    concurrency = configured.get("CALLBACK_CONCURRENCY", DEFAULTS["CALLBACK_CONCURRENCY"])
    per_endpoint = configured.get("CALLBACK_CONCURRENCY_PER_ENDPOINT", DEFAULTS["CALLBACK_CONCURRENCY_PER_ENDPOINT"])
    if (
        isinstance(concurrency, int)
        and isinstance(per_endpoint, int)
        and 1 <= per_endpoint
        and per_endpoint > concurrency
    ):
        errors.append(
            Error(
                f"CALLBACK_CONCURRENCY_PER_ENDPOINT ({per_endpoint}) must be at most "
                f"CALLBACK_CONCURRENCY ({concurrency}).",
                id="conductor.E071",
            )
        )
    return errors


def _check_limit_settings(configured: dict) -> list[Error]:
    errors = []
    rate = configured.get("API_RATE", DEFAULTS["API_RATE"])
    try:
        validate_api_rate(rate)
    except ValidationError:
        errors.append(
            Error(
                f"CONDUCTOR['API_RATE'] is {rate!r}.",
                hint="Write e.g. 100/s or 3000/min, or 'none' for no limit.",
                id="conductor.E050",
            )
        )
    for channel, quota in configured.get("DAILY_QUOTA", {}).items():
        if channel not in Channel.values or not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
            errors.append(
                Error(
                    f"CONDUCTOR['DAILY_QUOTA'][{channel!r}] = {quota!r} cannot work.",
                    hint=f"Channels: {', '.join(Channel.values)}; quotas are whole numbers of messages, 0 or more.",
                    id="conductor.E051",
                )
            )
    ratio = configured.get("QUOTA_WARNING_RATIO", DEFAULTS["QUOTA_WARNING_RATIO"])
    if not 0 < ratio <= 1:
        errors.append(Error("CONDUCTOR['QUOTA_WARNING_RATIO'] must be above 0 and at most 1.", id="conductor.E052"))
    try:
        validate_priorities(configured.get("ALLOWED_PRIORITIES", DEFAULTS["ALLOWED_PRIORITIES"]))
    except ValidationError:
        errors.append(
            Error(
                "CONDUCTOR['ALLOWED_PRIORITIES'] names an unknown priority.",
                hint=f"Known: {', '.join(Priority.values)}.",
                id="conductor.E053",
            )
        )
    return errors


def _check_receipt_settings(configured: dict) -> list[Error]:
    errors = []
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
