"""The checks only the wiring can make: every key of settings.CONDUCTOR belongs to one layer's
schema, the broker's settings can keep its promises, in production mode nothing still points
at the sandbox or at this machine, and a Redis Cluster for state is not also given to Celery as
its broker."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from django.conf import settings
from django.core.checks import Error, Warning, register
from kombu import Connection
from redis.connection import parse_url

from messaging.conf import DEFAULTS as MESSAGING_DEFAULTS
from messaging.conf import messaging_setting
from messaging.routing import routed_providers
from providers.conf import DEFAULTS as PROVIDERS_DEFAULTS
from providers.conf import SANDBOX_SECRETS
from reconciliation.conf import DEFAULTS as RECONCILIATION_DEFAULTS

MODES = ("sandbox", "production")
# Secret keys shipped in this repository (settings' fallback, docker/compose.yml's old default):
# anyone could forge sessions and password-reset links with them.
PUBLIC_SECRET_KEYS = frozenset({"change-me-in-production", "changeme", "secret"})

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


@register()
def check_state_redis(app_configs=None, **kwargs) -> list[Error]:
    """With REDIS_CLUSTER on: conductor.E110, REDIS_URL must be a TCP URL of database 0 (a cluster
    has no other, and the client refuses one); conductor.E111, the broker must not be that
    cluster (kombu's Redis transport speaks to one node: every queue whose slot another node
    serves would fail with MOVED)."""
    if not getattr(settings, "REDIS_CLUSTER", False):
        return []
    try:
        state = parse_url(settings.REDIS_URL)
    except ValueError as exc:
        state = {"path": "", "error": str(exc)}
    if "path" in state or state.get("db", 0) != 0:
        return [
            Error(
                f"REDIS_URL is {settings.REDIS_URL!r} with REDIS_CLUSTER on: a cluster node is reached over "
                "TCP and has database 0 only.",
                hint="Set REDIS_URL to one node of the cluster, e.g. redis://redis-1:6379/0.",
                id="conductor.E110",
            )
        ]
    broker = str(getattr(settings, "CELERY_BROKER_URL", "") or "")
    if broker.startswith(("redis://", "rediss://")):
        try:
            target = parse_url(broker)
        except ValueError:
            return []
        if (target.get("host"), target.get("port", 6379)) == (state.get("host"), state.get("port", 6379)):
            return [
                Error(
                    f"CELERY_BROKER_URL is the state Redis Cluster ({broker!r}): Celery's broker cannot be a "
                    "Redis Cluster.",
                    hint="Set CELERY_BROKER_URL to a Redis of its own or to RabbitMQ (amqp://…); see "
                    'docs/operations.md, "Redis Cluster for state".',
                    id="conductor.E111",
                )
            ]
    return []


@register()
def check_broker(app_configs=None, **kwargs) -> list[Error | Warning]:
    """Broker settings that would break a guarantee quietly (docs/brokers.md): on RabbitMQ, what
    quorum queues refuse or what makes countdowns wait inside workers; on Redis, a visibility
    timeout that re-delivers retries waiting out their countdown (a duplicate claim each)."""
    url = getattr(settings, "CELERY_BROKER_URL", "") or ""
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", None) or {}
    if Connection(url).transport.driver_type != "amqp":
        timeout = options.get("visibility_timeout", 3600)  # kombu's Redis transport default
        if timeout > messaging_setting("MAX_COUNTDOWN_SECONDS"):
            return []
        return [
            Error(
                f"The Redis broker's visibility_timeout ({timeout} s) is not above MAX_COUNTDOWN_SECONDS "
                f"({messaging_setting('MAX_COUNTDOWN_SECONDS')} s): a retry waiting out its countdown would be "
                "delivered again to another worker.",
                hint="Raise CELERY_VISIBILITY_TIMEOUT (default 600).",
                id="conductor.E133",
            )
        ]
    return _quorum_queues() + _quorum_qos() + _delayed_delivery() + _publisher_confirms(options)


def _task_queues() -> list:
    return list(getattr(settings, "CELERY_TASK_QUEUES", None) or [])


def _quorum_queues() -> list[Error]:
    """conductor.E130: every task queue is a durable quorum queue without priorities (quorum
    queues have none before RabbitMQ 4.0, and a restart must find the queue and its tasks)."""
    errors = []
    for queue in _task_queues():
        arguments = queue.queue_arguments or {}
        problem = None
        if arguments.get("x-queue-type") != "quorum":
            problem = "is not a quorum queue (x-queue-type)"
        elif "x-max-priority" in arguments or getattr(settings, "CELERY_TASK_QUEUE_MAX_PRIORITY", None):
            problem = "has priorities, which quorum queues do not support"
        elif not queue.durable or queue.auto_delete or queue.exclusive:
            problem = "is not durable, or is auto-delete or exclusive"
        if problem:
            errors.append(
                Error(
                    f"On RabbitMQ the task queue {queue.name!r} {problem}.",
                    hint='Declare it as Queue(name, exchange, routing_key=name, queue_arguments={"x-queue-type": '
                    '"quorum"}), as conductor_project/settings/base.py does.',
                    id="conductor.E130",
                )
            )
    return errors


def _quorum_qos() -> list[Error]:
    """conductor.E131: RabbitMQ refuses a consumer with a global prefetch on a quorum queue."""
    if getattr(settings, "CELERY_WORKER_DETECT_QUORUM_QUEUES", True):
        return []
    return [
        Error(
            "CELERY_WORKER_DETECT_QUORUM_QUEUES is off: workers would ask for global QoS, which quorum queues refuse.",
            hint="Leave it on (Celery's default).",
            id="conductor.E131",
        )
    ]


def _delayed_delivery() -> list[Error]:
    """conductor.E132: a countdown (a retry) published to a direct exchange is held unacked by a
    worker until due, which blocks it (Celery's native delayed delivery needs a topic exchange)."""
    direct = sorted(
        {queue.exchange.name for queue in _task_queues() if queue.exchange and queue.exchange.type == "direct"}
    )
    if not direct and getattr(settings, "CELERY_TASK_DEFAULT_EXCHANGE_TYPE", "direct") == "topic":
        return []
    return [
        Error(
            f"On RabbitMQ the task exchange must be a topic exchange (direct: {', '.join(direct) or 'the default'}).",
            hint='Exchange("conductor", type="topic") and CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic".',
            id="conductor.E132",
        )
    ]


def _publisher_confirms(options: dict) -> list[Warning]:
    """conductor.W130: without confirms a publish RabbitMQ drops (a full or restarting queue) is
    not noticed: the task is only republished by the sweeper, after its stale time."""
    if options.get("confirm_publish"):
        return []
    return [
        Warning(
            "Publisher confirms are off (CELERY_BROKER_TRANSPORT_OPTIONS['confirm_publish']).",
            hint="Turn them on, as conductor_project/settings/base.py does for an amqp:// broker.",
            id="conductor.W130",
        )
    ]


@register()
def check_production_mode(app_configs=None, **kwargs) -> list[Error]:
    """CONDUCTOR_MODE=production refuses what would make a deployment send nothing, or take forged
    receipts, while looking healthy: a routed provider at the sandbox (it accepts every message and
    reports it delivered), receipt URLs on loopback (no provider can reach them), a public or weak
    SECRET_KEY, DEBUG. Not deployment-only (`check --deploy`): the web, workers, beat and the
    receipt intake run these checks and refuse to start (refuse_to_start_on_errors)."""
    mode = getattr(settings, "CONDUCTOR_MODE", "sandbox")
    if mode not in MODES:
        return [Error(f"CONDUCTOR_MODE is {mode!r}.", hint=f"Use one of: {', '.join(MODES)}.", id="conductor.E040")]
    if mode != "production":
        return []
    return _sandbox_providers() + _loopback_urls() + _secret_key() + _debug()


def _sandbox_providers() -> list[Error]:
    """conductor.E041: a routed provider whose BASE_URL is the sandbox's; conductor.E045: each of
    its secrets still the sandbox's (outside the sandbox, conductor.E023 names those)."""
    sandbox = str(getattr(settings, "SANDBOX_URL", "") or "").rstrip("/")
    errors: list[Error] = []
    providers = getattr(settings, "CONDUCTOR_PROVIDERS", {})
    for name in sorted(routed_providers()):
        conf = providers.get(name, {})
        if "BASE_URL" not in conf or str(conf["BASE_URL"] or "").rstrip("/") != sandbox:
            continue
        env = name.upper()
        errors.append(
            Error(
                f"CONDUCTOR_PROVIDERS[{name!r}]['BASE_URL'] is the sandbox ({sandbox!r}) in production mode: "
                f"{name} is routed to, and the sandbox accepts every message and reports it delivered.",
                hint=f"Set {env}_BASE_URL to the real {name} API (and its credentials), or take {name} out of "
                "the routes (CONDUCTOR_ROUTE_SMS, CONDUCTOR_ROUTE_WHATSAPP, CONDUCTOR_ROUTE_EMAIL).",
                id="conductor.E041",
            )
        )
        for key, default in SANDBOX_SECRETS.get(name, {}).items():
            if conf.get(key) == default:
                errors.append(
                    Error(
                        f"CONDUCTOR_PROVIDERS[{name!r}][{key!r}] is still the sandbox's default (public, in "
                        "this repository) in production mode.",
                        hint=f"Set {env}_{key} to the provider's own secret.",
                        id="conductor.E045",
                    )
                )
    return errors


def _loopback_urls() -> list[Error]:
    """conductor.E042: providers are given these URLs for their receipts; a host only this machine
    or a private network can reach (loopback, a private address, a single-label name such as
    compose's "web") means every receipt is lost."""
    configured = getattr(settings, "CONDUCTOR", {})
    errors: list[Error] = []
    for key, env in (("PUBLIC_URL", "CONDUCTOR_PUBLIC_URL"), ("RECEIPTS_URL", "CONDUCTOR_RECEIPTS_URL")):
        url = configured.get(key, PROVIDERS_DEFAULTS[key])
        if url and is_unreachable_from_outside(url):
            errors.append(
                Error(
                    f"CONDUCTOR[{key!r}] is {url!r}, which only this machine or its private network can reach, "
                    "in production mode: providers post receipts there.",
                    hint=f"Set {env} to the public https:// base URL that reaches this service.",
                    id="conductor.E042",
                )
            )
    return errors


def is_unreachable_from_outside(url: str) -> bool:
    """Whether a provider on the internet cannot reach the URL's host: loopback, unspecified,
    private or link-local addresses, localhost, and single-label names (an internal DNS name)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    if not host or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." not in host
    return address.is_loopback or address.is_unspecified or address.is_private or address.is_link_local


def _secret_key() -> list[Error]:
    """conductor.E043: the fallback key (settings.DEV_SECRET_KEY), one shipped in this repository,
    or a weak one by Django's own measure (security.W009: under 50 characters or 5 distinct)."""
    key = str(getattr(settings, "SECRET_KEY", "") or "")
    fallback = getattr(settings, "DEV_SECRET_KEY", None)
    if key in (fallback, *PUBLIC_SECRET_KEYS) or key.startswith("django-insecure-"):
        problem = "not set (the development fallback is used)" if key == fallback else "a public default"
    elif len(key) < 50 or len(set(key)) < 5:
        problem = "weak (under 50 characters, or under 5 distinct ones)"
    else:
        return []
    return [
        Error(
            f"SECRET_KEY is {problem} in production mode: sessions and password-reset links could be forged.",
            hint="Set SECRET_KEY to a long random value, e.g. "
            'python -c "import secrets; print(secrets.token_urlsafe(50))".',
            id="conductor.E043",
        )
    ]


def _debug() -> list[Error]:
    """conductor.E044: DEBUG shows settings and tracebacks to anyone and keeps every query in memory."""
    if not getattr(settings, "DEBUG", False):
        return []
    return [Error("DEBUG is on in production mode.", hint="Unset DEBUG (or set DEBUG=0).", id="conductor.E044")]


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
