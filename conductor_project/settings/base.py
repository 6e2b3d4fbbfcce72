"""Conductor's settings, read from the environment; the only module that reads it.

With no DATABASE_URL the database is the PostgreSQL `make run` runs itself (the pgserver wheel's,
data in var/postgres, 127.0.0.1:CONDUCTOR_EMBEDDED_DB_PORT) and with no REDIS_URL/CELERY_BROKER_URL
a local Redis on 127.0.0.1:6379 is used, so `make run` works on a machine with only Python 3.11.
"""

from __future__ import annotations

import logging
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from kombu import Connection, Exchange, Queue

from conductor_project.env import env_bool, env_clock, env_float, env_int, env_json, env_list, env_str
from messaging.conf import DEFAULTS as MESSAGING_DEFAULTS
from providers.conf import SANDBOX_SECRETS

BASE_DIR = Path(__file__).resolve().parent.parent.parent
VAR_DIR = Path(env_str("CONDUCTOR_VAR_DIR", str(BASE_DIR / "var")))

# "sandbox" (the default: `make run` works with no configuration, every provider is the bundled
# emulator) or "production": then start-up refuses settings that would send nothing or take
# forged receipts while looking healthy (conductor_project/checks.py).
CONDUCTOR_MODE = env_str("CONDUCTOR_MODE", "sandbox")
DEBUG = env_bool("DEBUG", False)
# The fallback starts with "django-insecure-" so that `check --deploy` warns (security.W009) and
# production mode refuses it (conductor.E043).
DEV_SECRET_KEY = "django-insecure-dev-only-key-set-SECRET_KEY-in-production"
SECRET_KEY = env_str("SECRET_KEY") or DEV_SECRET_KEY
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])

# --- HTTPS ----------------------------------------------------------------------------------
# Behind a TLS-terminating proxy that sets X-Forwarded-Proto (and strips it from clients):
# requests it forwarded over HTTPS count as secure (CSRF's origin check, secure cookies, redirects).
if env_bool("CONDUCTOR_BEHIND_TLS_PROXY", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# The admin's and dashboard's public origins, e.g. https://conductor.example.com (CSRF checks the
# Origin header of every form post against them).
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
_PRODUCTION = CONDUCTOR_MODE == "production"
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", _PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", _PRODUCTION)
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Probes and Prometheus call these over plain HTTP from inside the network: never redirected.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^livez/beat$", r"^metrics$"]
# HSTS is sticky in browsers (a wrong value locks users out for that long): 0 (off) unless set.
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "anymail",
    "messaging",
    "providers",
    "reconciliation",
    "conductor_project",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "conductor_project.urls"
WSGI_APPLICATION = "conductor_project.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
# With no DATABASE_URL: the PostgreSQL `make run` runs itself (messaging.local_postgres, from the
# pgserver wheel), its data in var/postgres, on 127.0.0.1 at this port (5433: beside a local
# PostgreSQL's 5432). Not SQLite, as SPEC §1 first said: the send path's SQL is PostgreSQL's
# (FOR UPDATE SKIP LOCKED, UPDATE ... FROM jsonb_to_recordset(...), = ANY(%s::uuid[]), advisory
# locks), so development runs the SQL production runs. Tests always have a DATABASE_URL (settings.test).
EMBEDDED_DB_PORT = env_int("CONDUCTOR_EMBEDDED_DB_PORT", 5433)
EMBEDDED_DB_DIR = None if DATABASE_URL else VAR_DIR / "postgres"
EMBEDDED_DB_NAME = "conductor"
DATABASES = {
    "default": dj_database_url.parse(
        DATABASE_URL or f"postgres://postgres@127.0.0.1:{EMBEDDED_DB_PORT}/{EMBEDDED_DB_NAME}",
        conn_max_age=env_int("CONN_MAX_AGE", 60),
    )
}
# A restarted database must not leave workers holding dead connections.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# A host cut off the network in the middle of a transaction leaves its session open on the
# server, holding its row locks, until PostgreSQL notices that the client is gone (TCP
# keepalives: two hours by default); the sweeper and every claim of those rows wait as long
# (docs/multi-host.md). Our transactions never wait on the network, so a session idle inside
# one this long, or whose data stays unacknowledged this long, has lost its client: the server
# ends it and its locks go. Per session (startup options), so no server configuration is
# needed; 0 leaves the server's settings (e.g. behind a pooler that refuses startup options).
DATABASE_DEAD_CLIENT_SECONDS = env_float("DATABASE_DEAD_CLIENT_SECONDS", 30.0)
if DATABASE_DEAD_CLIENT_SECONDS > 0 and "postgresql" in DATABASES["default"]["ENGINE"]:
    _dead_ms = max(1, round(DATABASE_DEAD_CLIENT_SECONDS * 1000))
    _dead_client = {
        "idle_in_transaction_session_timeout": _dead_ms,
        "tcp_user_timeout": _dead_ms,
        # Idle sessions outside a transaction hold no lock, only a connection slot.
        "tcp_keepalives_idle": max(1, round(DATABASE_DEAD_CLIENT_SECONDS)),
        "tcp_keepalives_interval": max(1, round(DATABASE_DEAD_CLIENT_SECONDS / 3)),
        "tcp_keepalives_count": 3,
    }
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    _options["options"] = " ".join(
        filter(None, [_options.get("options", ""), *(f"-c {k}={v}" for k, v in _dead_client.items())])
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

# --- Redis and Celery -----------------------------------------------------------------------
# Shared state (circuit breakers, rate limits, quotas, the API throttle, coordination flags):
# providers.redis_state.shared_redis() is its one client.
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# On: REDIS_URL names a seed node of a Redis Cluster (db 0), the client finds the others. The
# Celery broker cannot be a cluster (kombu): CELERY_BROKER_URL must then name a Redis or RabbitMQ
# of its own (conductor.E110, E111).
REDIS_CLUSTER = env_bool("REDIS_CLUSTER", False)
# The API's per-client request counts (messaging.api.throttling) are shared by every web process:
# Redis, not the per-process local memory cache. The backend uses the shared state client (its
# short timeouts: a Redis that does not answer is treated as unreachable, the throttle fails open).
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "throttle": {"BACKEND": "providers.redis_state.StateRedisCache", "KEY_PREFIX": "conductor"},
}
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
# Redis (redis://, the default) or RabbitMQ (amqp://, amqps://; docs/brokers.md). Redis stays the
# store of circuit, rate-limit and throttle state (REDIS_URL) whichever carries the tasks.
BROKER_IS_AMQP = Connection(CELERY_BROKER_URL).transport.driver_type == "amqp"  # no connection made
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = "UTC"
# A message is acknowledged only after its task ran, and re-queued if the worker dies mid-task.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# A broker restart or outage never costs a worker (docs/operations.md, "Broker restarts"): it
# reconnects for as long as the broker is away (Celery gives up after 100 attempts by default,
# about 47 minutes, and the worker exits)...
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
# ...and a task running when the connection drops finishes: cancelling it (Celery 6's default)
# would kill a provider call in flight, whose outcome is then unknown. Its ack is lost with the
# connection; the copy Redis re-delivers finds the message already dispatched and sends nothing.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Celery closes every database connection around every task unless this is set (celery#9824):
# connections are kept per CONN_MAX_AGE instead (conductor_project/celery.py); Celery's own
# close still runs every this many tasks, as a backstop.
CELERY_DB_REUSE_MAX = env_int("CELERY_DB_REUSE_MAX", 1000)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Publishing gives up fast when the broker is down: the row is already committed and the
    # sweeper publishes it later, so an API request must not stall retrying the broker.
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.2,
    "interval_max": 0.5,
}
if BROKER_IS_AMQP:
    # RabbitMQ: quorum queues (replicated, on disk, kept across a broker restart) and publisher
    # confirms (a publish returns once the queue has the task, else raises and the sweeper
    # publishes it later): a task is never lost silently between the API and the queue.
    CELERY_BROKER_TRANSPORT_OPTIONS["confirm_publish"] = True
    CELERY_TASK_DEFAULT_QUEUE_TYPE = "quorum"
    CELERY_TASK_CREATE_MISSING_QUEUE_TYPE = "quorum"
    # Quorum queues have no global QoS: Celery's per-consumer prefetch instead (conductor.E131).
    CELERY_WORKER_DETECT_QUORUM_QUEUES = True
    # A countdown (a retry, at most MAX_COUNTDOWN_SECONDS) waits in the broker's delay queues, not
    # unacked in a worker's memory: RabbitMQ's native delayed delivery, which needs a topic exchange.
    CELERY_BROKER_NATIVE_DELAYED_DELIVERY_QUEUE_TYPE = "quorum"
    CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "topic"
else:
    # Redis re-delivers an unacked task after this long; it must exceed the longest countdown
    # (MAX_COUNTDOWN_SECONDS, 60 s) plus the longest task run, or ETA tasks would be duplicated.
    CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"] = env_int("CELERY_VISIBILITY_TIMEOUT", 600)
    CELERY_TASK_DEFAULT_EXCHANGE_TYPE = "direct"
# Task events cost ~0.85 ms of a worker's main process per task (bench/README.md, "Worker events").
# Off unless someone watches: a running Flower turns them on within 5 s (its enable_events
# broadcast), so `make run` and compose show every task; a deployment without Flower pays nothing.
CELERY_WORKER_SEND_TASK_EVENTS = env_bool("CELERY_WORKER_SEND_TASK_EVENTS", False)
CELERY_TASK_SEND_SENT_EVENT = False
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

CONDUCTOR_CHANNELS = ("sms", "whatsapp", "email")
CONDUCTOR_PRIORITIES = ("critical", "transactional", "bulk")
MAINTENANCE_QUEUE = "maintenance"
# Stored provider receipts applied to messages in batches (messaging.receipts), on a worker of
# their own: a long reconciliation run on the maintenance worker must not hold them up.
RECEIPTS_QUEUE = "receipts"
# Status callbacks to clients (messaging.callbacks): a worker of their own too, so that a client
# endpoint's timeouts never hold up sends, receipts or the sweeper.
CALLBACKS_QUEUE = "callbacks"
# Scheduled messages published when due (messaging.release_due, every second), on a worker of
# their own: behind a long maintenance job they would go late (docs/scheduling.md).
RELEASE_QUEUE = "release"
# Each queue bound by its own name; on RabbitMQ a quorum queue on a topic exchange (see above).
_exchange = Exchange("conductor", type=CELERY_TASK_DEFAULT_EXCHANGE_TYPE)
_queue_arguments = {"x-queue-type": "quorum"} if BROKER_IS_AMQP else None
CELERY_TASK_QUEUES = [
    Queue(name, _exchange, routing_key=name, queue_arguments=_queue_arguments)
    for name in [f"{channel}.{priority}" for channel in CONDUCTOR_CHANNELS for priority in CONDUCTOR_PRIORITIES]
    + [MAINTENANCE_QUEUE, RECEIPTS_QUEUE, CALLBACKS_QUEUE, RELEASE_QUEUE]
]
CELERY_TASK_ROUTES = {"messaging.deliver_callbacks": {"queue": CALLBACKS_QUEUE}}
CELERY_TASK_DEFAULT_QUEUE = MAINTENANCE_QUEUE
CELERY_TASK_DEFAULT_EXCHANGE = "conductor"
CELERY_TASK_DEFAULT_ROUTING_KEY = MAINTENANCE_QUEUE
CELERY_BEAT_SCHEDULER = env_str("CELERY_BEAT_SCHEDULER", "django_celery_beat.schedulers:DatabaseScheduler")
SWEEP_INTERVAL_SECONDS = env_float("CONDUCTOR_SWEEP_INTERVAL_SECONDS", 5.0)
RELEASE_INTERVAL_SECONDS = env_float("CONDUCTOR_RELEASE_INTERVAL_SECONDS", 1.0)
DLQ_PURGE_INTERVAL_SECONDS = env_float("CONDUCTOR_DLQ_PURGE_INTERVAL_SECONDS", 3600.0)
RECEIPT_POLL_INTERVAL_SECONDS = env_float("CONDUCTOR_RECEIPT_POLL_INTERVAL_SECONDS", 60.0)
ANOMALY_INTERVAL_SECONDS = env_float("CONDUCTOR_ANOMALY_INTERVAL_SECONDS", 60.0)
QUEUE_SAMPLE_INTERVAL_SECONDS = env_float("CONDUCTOR_QUEUE_SAMPLE_INTERVAL_SECONDS", 15.0)
CALLBACK_ENDPOINT_CHECK_INTERVAL_SECONDS = env_float("CONDUCTOR_CALLBACK_ENDPOINT_CHECK_INTERVAL_SECONDS", 60.0)
PERIODIC_JOB_CHECK_INTERVAL_SECONDS = env_float("CONDUCTOR_PERIODIC_JOB_CHECK_INTERVAL_SECONDS", 60.0)
RECONCILE_HOUR, RECONCILE_MINUTE = env_clock("CONDUCTOR_RECONCILE_AT", "02:00")
CELERY_BEAT_SCHEDULE = {
    "messaging.sweep": {
        "task": "messaging.sweep",
        "schedule": SWEEP_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": SWEEP_INTERVAL_SECONDS * 2},
    },
    # Scheduled messages whose send_at has come are published (the sweeper catches lost ones).
    "messaging.release_due": {
        "task": "messaging.release_due",
        "schedule": RELEASE_INTERVAL_SECONDS,
        "options": {"queue": RELEASE_QUEUE, "expires": RELEASE_INTERVAL_SECONDS * 2},
    },
    # Dead letters past their retention (per priority and category) are deleted in batches.
    "reconciliation.purge_dead_letters": {
        "task": "reconciliation.purge_dead_letters",
        "schedule": DLQ_PURGE_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": DLQ_PURGE_INTERVAL_SECONDS},
    },
    # Dispatched messages whose receipt is overdue are asked about at their provider.
    "reconciliation.poll_receipts": {
        "task": "reconciliation.poll_receipts",
        "schedule": RECEIPT_POLL_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": RECEIPT_POLL_INTERVAL_SECONDS},
    },
    # Delivery buckets brought up to date, anomalies detected, alerts opened and resolved.
    "reconciliation.detect_anomalies": {
        "task": "reconciliation.detect_anomalies",
        "schedule": ANOMALY_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": ANOMALY_INTERVAL_SECONDS},
    },
    # Queue depths sampled for the dashboard (the maximum per minute and per hour is kept).
    "reconciliation.sample_queues": {
        "task": "reconciliation.sample_queues",
        "schedule": QUEUE_SAMPLE_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": QUEUE_SAMPLE_INTERVAL_SECONDS},
    },
    # Clients' callback endpoints failing for longer than CALLBACK_DISABLE_AFTER_SECONDS disabled, with an alert.
    "reconciliation.disable_failing_callback_endpoints": {
        "task": "reconciliation.disable_failing_callback_endpoints",
        "schedule": CALLBACK_ENDPOINT_CHECK_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": CALLBACK_ENDPOINT_CHECK_INTERVAL_SECONDS},
    },
    # The periodic jobs' heartbeats judged, overdue-job alerts opened and resolved (the web judges
    # too, on /livez/beat and /metrics: a dead beat runs no check; docs/operations.md).
    "reconciliation.check_periodic_jobs": {
        "task": "reconciliation.check_periodic_jobs",
        "schedule": PERIODIC_JOB_CHECK_INTERVAL_SECONDS,
        "options": {"queue": MAINTENANCE_QUEUE, "expires": PERIODIC_JOB_CHECK_INTERVAL_SECONDS},
    },
    # The previous day reconciled against receipts and the providers' status (UTC).
    "reconciliation.reconcile": {
        "task": "reconciliation.reconcile",
        "schedule": crontab(hour=RECONCILE_HOUR, minute=RECONCILE_MINUTE),
        "options": {"queue": MAINTENANCE_QUEUE},
    },
}

# --- Conductor ------------------------------------------------------------------------------
SANDBOX_URL = env_str("CONDUCTOR_SANDBOX_URL", "http://127.0.0.1:8025")
# The sandbox provider's delivery delay: how long after acceptance its messages reach their final
# status (every provider's receipt_delay_ms at start and after a reset; the control API changes it
# per provider). A provider validity shorter than this expires the message (docs/deadlines.md).
SANDBOX_DELIVERY_DELAY_MS = env_float("CONDUCTOR_SANDBOX_DELIVERY_DELAY_MS", 200.0)
# Each layer owns some of these keys, with their defaults: providers/conf.py, messaging/conf.py,
# reconciliation/conf.py; each app's checks validate its own, conductor_project.checks rejects unknown keys.
CONDUCTOR = {
    "PUBLIC_URL": env_str("CONDUCTOR_PUBLIC_URL", "http://127.0.0.1:8000"),
    "RECEIPTS_URL": env_str("CONDUCTOR_RECEIPTS_URL", ""),
    # Providers tried in order per channel, e.g. CONDUCTOR_ROUTE_SMS=vonage,twilio.
    "ROUTES": {
        "sms": env_list("CONDUCTOR_ROUTE_SMS", ["twilio", "vonage"]),
        "whatsapp": env_list("CONDUCTOR_ROUTE_WHATSAPP", ["twilio"]),
        "email": env_list("CONDUCTOR_ROUTE_EMAIL", ["mailgun", "smtp"]),
    },
    "DISPATCH_LEASE_SECONDS": env_float("CONDUCTOR_DISPATCH_LEASE_SECONDS", 60.0),
    # Bulk messages per dispatch_batch task, and provider calls in flight at once per worker process.
    "BULK_BATCH_SIZE": env_int("CONDUCTOR_BULK_BATCH_SIZE", 500),
    "BULK_SEND_CONCURRENCY": env_int("CONDUCTOR_BULK_SEND_CONCURRENCY", 100),
    # Overrides of providers.circuit.CircuitSettings for every provider (each provider's block may
    # override again under "CIRCUIT_BREAKER"); the defaults and their reasons are in that module.
    "CIRCUIT_BREAKER": {
        "open_seconds": env_float("CONDUCTOR_CIRCUIT_OPEN_SECONDS", 30.0),
        "failure_rate_threshold": env_float("CONDUCTOR_CIRCUIT_FAILURE_RATE_THRESHOLD", 0.5),
    },
    "MAX_WORKER_LOSSES": env_int("CONDUCTOR_MAX_WORKER_LOSSES", 3),
    # Categories a STOP or unsubscribe without a scope leaves alone, for clients without their own list.
    "OPT_OUT_EXEMPT_CATEGORIES": env_list("CONDUCTOR_OPT_OUT_EXEMPT_CATEGORIES", []),
    # The answer to an inbound SMS HELP/INFO (messaging/conf.py has the default text).
    "SMS_HELP_REPLY": env_str("CONDUCTOR_SMS_HELP_REPLY", MESSAGING_DEFAULTS["SMS_HELP_REPLY"]),
    "WHATSAPP_SESSION_WINDOW_HOURS": env_float(
        "CONDUCTOR_WHATSAPP_SESSION_WINDOW_HOURS", MESSAGING_DEFAULTS["WHATSAPP_SESSION_WINDOW_HOURS"]
    ),
    # Email categories with List-Unsubscribe headers (bulk emails have them whatever their category).
    "LIST_UNSUBSCRIBE_CATEGORIES": env_list("CONDUCTOR_LIST_UNSUBSCRIBE_CATEGORIES", ["marketing", "newsletter"]),
    # Status callbacks to clients: one request's limit, and requests in flight per delivering
    # process, in all and per endpoint (messaging/conf.py).
    "CALLBACK_TIMEOUT_SECONDS": env_float("CONDUCTOR_CALLBACK_TIMEOUT_SECONDS", 10.0),
    "CALLBACK_CONCURRENCY": env_int("CONDUCTOR_CALLBACK_CONCURRENCY", 256),
    "CALLBACK_CONCURRENCY_PER_ENDPOINT": env_int("CONDUCTOR_CALLBACK_CONCURRENCY_PER_ENDPOINT", 16),
    # Callback URLs inside our own network (SSRF): refused in production unless allowed here.
    "CALLBACK_ALLOW_PRIVATE_NETWORKS": env_bool("CONDUCTOR_CALLBACK_ALLOW_PRIVATE_NETWORKS", not _PRODUCTION),
    "RECEIPT_TIMEOUT_SECONDS": {
        channel: env_float("CONDUCTOR_RECEIPT_TIMEOUT_SECONDS", 600.0) for channel in ("sms", "whatsapp", "email")
    },
    # Detector overrides as JSON, e.g. CONDUCTOR_ANOMALY='{"min_samples": 50, "windows_seconds": [300, 3600]}'.
    "ANOMALY": env_json("CONDUCTOR_ANOMALY", {}),
    # Fallback on silence per category as JSON, e.g. CONDUCTOR_SILENCE_FALLBACK='{"otp": {"after_seconds": 60}}'
    # (docs/silence-fallback.md); unset: off.
    "SILENCE_FALLBACK": env_json("CONDUCTOR_SILENCE_FALLBACK", {}),
    "ALERT_WEBHOOK_URL": env_str("ALERT_WEBHOOK_URL"),
    "CALLBACK_DISABLE_AFTER_SECONDS": env_float("CONDUCTOR_CALLBACK_DISABLE_AFTER_SECONDS", 86400.0),
    "CALLBACK_RETENTION_SECONDS": env_float("CONDUCTOR_CALLBACK_RETENTION_SECONDS", 7 * 86400.0),
    # A periodic job is overdue (/livez/beat 503, an alert) once it has not succeeded for this many
    # of its intervals plus the grace (reconciliation/conf.py has the reasons).
    "PERIODIC_JOB_OVERDUE_INTERVALS": env_float("CONDUCTOR_PERIODIC_JOB_OVERDUE_INTERVALS", 3.0),
    "PERIODIC_JOB_OVERDUE_GRACE_SECONDS": env_float("CONDUCTOR_PERIODIC_JOB_OVERDUE_GRACE_SECONDS", 60.0),
}
CONDUCTOR_PROVIDERS = {
    "twilio": {
        "ACCOUNT_SID": env_str("TWILIO_ACCOUNT_SID", "AC00000000000000000000000000000000"),
        "AUTH_TOKEN": env_str("TWILIO_AUTH_TOKEN", SANDBOX_SECRETS["twilio"]["AUTH_TOKEN"]),
        "FROM_NUMBER": env_str("TWILIO_FROM_NUMBER", "+15005550006"),
        "WHATSAPP_FROM": env_str("TWILIO_WHATSAPP_FROM", "whatsapp:+14155238886"),
        "BASE_URL": env_str("TWILIO_BASE_URL", SANDBOX_URL),
        "TIMEOUT_SECONDS": env_float("TWILIO_TIMEOUT_SECONDS", 10.0),
        # After an ambiguous send, how long an empty look-up is not yet trusted (records lag).
        "LOOKUP_SETTLE_SECONDS": env_float("TWILIO_LOOKUP_SETTLE_SECONDS", 30.0),
        # Messages per second across every worker (None: unlimited), so a campaign is not throttled.
        "RATE_LIMIT_PER_SECOND": env_float("TWILIO_RATE_LIMIT_PER_SECOND", 0.0) or None,
        # After this long without a final receipt (none came, polling says nothing final) the
        # message's delivery is recorded as unknown: the provider's own reporting window.
        "RECEIPT_HORIZON_SECONDS": env_float("TWILIO_RECEIPT_HORIZON_SECONDS", 72 * 3600.0),
    },
    "vonage": {
        "API_KEY": env_str("VONAGE_API_KEY", "sandboxkey"),
        "API_SECRET": env_str("VONAGE_API_SECRET", SANDBOX_SECRETS["vonage"]["API_SECRET"]),
        # Signs delivery receipts (Vonage dashboard: "signature secret"); receipts are refused unsigned.
        "SIGNATURE_SECRET": env_str("VONAGE_SIGNATURE_SECRET", SANDBOX_SECRETS["vonage"]["SIGNATURE_SECRET"]),
        "SIGNATURE_METHOD": env_str("VONAGE_SIGNATURE_METHOD", "sha256"),
        "FROM": env_str("VONAGE_FROM", "Conductor"),
        "BASE_URL": env_str("VONAGE_BASE_URL", SANDBOX_URL),
        "TIMEOUT_SECONDS": env_float("VONAGE_TIMEOUT_SECONDS", 10.0),
        "LOOKUP_SETTLE_SECONDS": env_float("VONAGE_LOOKUP_SETTLE_SECONDS", 120.0),
        # Messages per second across every worker (None: unlimited), so a campaign is not throttled.
        "RATE_LIMIT_PER_SECOND": env_float("VONAGE_RATE_LIMIT_PER_SECOND", 0.0) or None,
        # After this long without a final receipt (none came, polling says nothing final) the
        # message's delivery is recorded as unknown: the provider's own reporting window.
        "RECEIPT_HORIZON_SECONDS": env_float("VONAGE_RECEIPT_HORIZON_SECONDS", 72 * 3600.0),
    },
    "mailgun": {
        "API_KEY": env_str("MAILGUN_API_KEY", SANDBOX_SECRETS["mailgun"]["API_KEY"]),
        "DOMAIN": env_str("MAILGUN_DOMAIN", "mg.example.com"),
        "WEBHOOK_SIGNING_KEY": env_str(
            "MAILGUN_WEBHOOK_SIGNING_KEY", SANDBOX_SECRETS["mailgun"]["WEBHOOK_SIGNING_KEY"]
        ),
        # Mailgun signs a timestamp and a one-time token, not the body: older (or as far ahead) is
        # refused, and a token is taken once within this window.
        "WEBHOOK_MAX_AGE_SECONDS": env_float("MAILGUN_WEBHOOK_MAX_AGE_SECONDS", 300.0),
        "BASE_URL": env_str("MAILGUN_BASE_URL", SANDBOX_URL),
        "FROM_EMAIL": env_str("MAILGUN_FROM_EMAIL", "Conductor <no-reply@mg.example.com>"),
        "TIMEOUT_SECONDS": env_float("MAILGUN_TIMEOUT_SECONDS", 10.0),
        "LOOKUP_SETTLE_SECONDS": env_float("MAILGUN_LOOKUP_SETTLE_SECONDS", 120.0),
        # Messages per second across every worker (None: unlimited), so a campaign is not throttled.
        "RATE_LIMIT_PER_SECOND": env_float("MAILGUN_RATE_LIMIT_PER_SECOND", 0.0) or None,
        # After this long without a final receipt (none came, polling says nothing final) the
        # message's delivery is recorded as unknown: the provider's own reporting window.
        "RECEIPT_HORIZON_SECONDS": env_float("MAILGUN_RECEIPT_HORIZON_SECONDS", 72 * 3600.0),
    },
    "smtp": {
        "HOST": env_str("SMTP_HOST", "127.0.0.1"),
        "PORT": env_int("SMTP_PORT", 1025),
        "USERNAME": env_str("SMTP_USERNAME", ""),
        "PASSWORD": env_str("SMTP_PASSWORD", ""),
        "USE_TLS": env_bool("SMTP_USE_TLS", False),
        "FROM_EMAIL": env_str("SMTP_FROM_EMAIL", "Conductor <no-reply@example.com>"),
        "TIMEOUT_SECONDS": env_float("SMTP_TIMEOUT_SECONDS", 10.0),
        "RATE_LIMIT_PER_SECOND": env_float("SMTP_RATE_LIMIT_PER_SECOND", 0.0) or None,
    },
}
# django-anymail reads its own settings block; it is derived from the mailgun entry above.
ANYMAIL = {
    "MAILGUN_API_KEY": CONDUCTOR_PROVIDERS["mailgun"]["API_KEY"],
    "MAILGUN_SENDER_DOMAIN": CONDUCTOR_PROVIDERS["mailgun"]["DOMAIN"],
    "MAILGUN_API_URL": CONDUCTOR_PROVIDERS["mailgun"]["BASE_URL"].rstrip("/") + "/v3",
    "MAILGUN_WEBHOOK_SIGNING_KEY": CONDUCTOR_PROVIDERS["mailgun"]["WEBHOOK_SIGNING_KEY"],
    "REQUESTS_TIMEOUT": CONDUCTOR_PROVIDERS["mailgun"]["TIMEOUT_SECONDS"],
}

# --- API ------------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["messaging.api.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["messaging.api.authentication.IsApiClient"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["messaging.api.parsers.ApiJSONParser"],
    "DEFAULT_SCHEMA_CLASS": "messaging.api.schema.ConductorAutoSchema",
    "EXCEPTION_HANDLER": "messaging.api.errors.exception_handler",
    # Per client, at its own rate (ApiClient.api_rate, else CONDUCTOR["API_RATE"]): 429 + Retry-After.
    "DEFAULT_THROTTLE_CLASSES": ["messaging.api.throttling.ClientRateThrottle"],
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Conductor API",
    "DESCRIPTION": "Send critical messages once, in order, on time, and know when they did not arrive.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Served from the app itself: no CDN needed.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # One schema name per choice set, however many fields use it.
    "ENUM_NAME_OVERRIDES": {
        "MessageStateEnum": "messaging.states.MessageState",
        "DeadLetterStateEnum": "messaging.states.DEAD_LETTER_STATE_CHOICES",
        "ChannelEnum": "messaging.routing.Channel",
        "PriorityEnum": "messaging.routing.Priority",
        "EventSourceEnum": "messaging.models.EventSource",
        "ErrorTypeEnum": "messaging.models.ErrorType",
        "OrderingModeEnum": "messaging.models.OrderingMode",
        "CallbackEventEnum": "messaging.models.CallbackEvent",
        "CallbackStateEnum": "messaging.models.CallbackState",
        "DeadLetterKindEnum": "messaging.models.DeadLetterKind",
    },
}

# --- Logging and Sentry ---------------------------------------------------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO")
# json (one object per line: message id, channel, provider, attempt, transition as fields) or
# plain, for reading a development terminal.
LOG_FORMAT = env_str("LOG_FORMAT", "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"celery_task": {"()": "messaging.logging.CeleryTaskFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {
            "()": "messaging.logging.FastJsonFormatter",
            "fmt": "%(levelname)s %(name)s %(process)d %(message)s",
            "timestamp": "time",  # ISO 8601, UTC
            "rename_fields": {"levelname": "level", "name": "logger", "process": "pid"},
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "json" if LOG_FORMAT == "json" else "plain",
            "filters": ["celery_task"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        # The twilio SDK logs full request bodies (recipients, texts) at INFO: never let it.
        "twilio": {"level": "WARNING"},
        "twilio.http_client": {"level": "WARNING"},
        "django.db.backends": {"level": "INFO"},
        # urllib3 logs each request's path at DEBUG: an alert webhook's secret, a provider's ids.
        "urllib3": {"level": "INFO"},
        # Two lines per task at INFO drown the transitions; Flower shows tasks.
        "celery.app.trace": {"level": env_str("CELERY_TASK_LOG_LEVEL", "WARNING")},
        "celery.worker.strategy": {"level": env_str("CELERY_TASK_LOG_LEVEL", "WARNING")},
    },
}

# No format above prints a record's caller, thread or process name: records skip looking them up
# (the logging HOWTO's "Optimization"), about 10 µs of a 50 µs line, once per transition.
logging._srcfile = None
logging.logThreads = False
logging.logMultiprocessing = False

# prometheus-client reads this variable itself, from the environment of every process, before
# any metric exists; here it only tells /metrics to sum the directory (conductor_project/metrics.py).
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR") or None
# When set, /metrics answers only requests with "Authorization: Bearer <this token>" (401 otherwise).
METRICS_TOKEN = env_str("CONDUCTOR_METRICS_TOKEN") or None
# The database-derived families of /metrics (six GROUP BY queries) are read at most this often per
# web process; a scrape in between gets the same numbers. 0: every scrape reads them.
METRICS_CACHE_SECONDS = env_float("CONDUCTOR_METRICS_CACHE_SECONDS", 15.0)

SENTRY_DSN = env_str("SENTRY_DSN")
if SENTRY_DSN:
    from conductor_project.sentry import sentry_init

    sentry_init(
        dsn=SENTRY_DSN,
        environment=env_str("SENTRY_ENVIRONMENT") or None,
        traces_sample_rate=env_float("SENTRY_TRACES_SAMPLE_RATE", 0.0),
    )
