"""Test settings: real PostgreSQL and Redis on 127.0.0.1, short timings so fault tests run fast."""

import os

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/conductor")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/14")

from conductor_project.settings.base import *  # noqa: E402,F401,F403
from conductor_project.settings.base import ANYMAIL, CONDUCTOR, CONDUCTOR_PROVIDERS  # noqa: E402

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CONDUCTOR = {**CONDUCTOR}
CONDUCTOR_PROVIDERS = {name: {**conf} for name, conf in CONDUCTOR_PROVIDERS.items()}

_CALLBACK_TIMEOUT_SECONDS = float(os.environ.get("CONDUCTOR_CALLBACK_TIMEOUT_SECONDS", "1.0"))
# Short timings: a lost worker is noticed in seconds, retries of the "fast_retry" category are quick.
CONDUCTOR.update(
    {
        "DISPATCH_LEASE_SECONDS": 8.0,
        "SWEEP_STALE_AFTER_SECONDS": {"critical": 3.0, "transactional": 5.0, "bulk": 10.0},
        "CATEGORY_POLICIES": {"fast_retry": {"base_seconds": 0.2, "cap_seconds": 2.0}},
        # Status callbacks: a hung receiver is given up on in a second and retried within two;
        # a deliverer's lost lease is claimed again after four.
        "CALLBACK_TIMEOUT_SECONDS": _CALLBACK_TIMEOUT_SECONDS,
        "CALLBACK_LEASE_SECONDS": max(4.0, 2 * _CALLBACK_TIMEOUT_SECONDS),
        "CALLBACK_BACKOFF_BASE_SECONDS": 0.2,
        "CALLBACK_BACKOFF_MAX_SECONDS": 2.0,
    }
)
for _provider in ("twilio", "vonage", "mailgun", "smtp"):
    CONDUCTOR_PROVIDERS[_provider]["TIMEOUT_SECONDS"] = 3.0
    if _provider != "smtp":  # the sandbox's records never lag
        CONDUCTOR_PROVIDERS[_provider]["LOOKUP_SETTLE_SECONDS"] = 0.0
ANYMAIL = {**ANYMAIL, "REQUESTS_TIMEOUT": 3.0}
# Tests change the database between two scrapes and expect the second to show it.
METRICS_CACHE_SECONDS = 0.0
