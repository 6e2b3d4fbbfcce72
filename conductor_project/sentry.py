"""Sentry: errors from web requests and Celery tasks, never personal data.

A message a provider refuses is an outcome, recorded on the message and in the dead letters,
not an error: it is handled inside the task and logged at INFO, so it never reaches Sentry. A
bug (an exception that escapes a view or a task) does, through the Django and Celery
integrations; ERROR log records do too (the logging integration's default).
"""

from __future__ import annotations

from typing import Any

import sentry_sdk
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.django import DjangoIntegration


def sentry_init(*, dsn: str, environment: str | None = None, traces_sample_rate: float = 0.0, **options: Any) -> None:
    """Start the Sentry client (settings call this when SENTRY_DSN is set; tests pass a transport)."""
    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        integrations=[DjangoIntegration(), CeleryIntegration(monitor_beat_tasks=False)],
        # send_default_pii stays off (its default; naming it is deprecated in favour of this):
        # no user or IP, no cookies, no request bodies, no SQL parameters, no local variables, no
        # task arguments. Recipients and message texts live in those places; they stay ours.
        data_collection={
            "user_info": False,
            "http_bodies": [],
            "database_query_data": False,
            "queues": False,
            "stack_frame_variables": False,
        },
        max_request_body_size="never",
        traces_sample_rate=traces_sample_rate,
        **options,
    )
