"""Celery tasks of the reconciliation app: thin triggers around its services (beat runs them)."""

from __future__ import annotations

import logging
from datetime import timedelta

import requests
from celery import shared_task
from django.utils import timezone

from messaging.logging import redacted_url
from reconciliation.alerts import POST_ALERT_TASK, anomalies_detect
from reconciliation.buckets import buckets_purge
from reconciliation.callbacks import callback_endpoints_disable_failing
from reconciliation.conf import reconciliation_setting
from reconciliation.heartbeats import periodic_jobs_check
from reconciliation.polling import receipts_poll_overdue
from reconciliation.queues import queue_depth_purge, queue_depth_sample
from reconciliation.reconcile import reconciliation_run
from reconciliation.retention import callbacks_purge_expired, dead_letters_purge_expired

logger = logging.getLogger(__name__)


class AlertWebhookError(Exception):
    """The alert endpoint answered with a server error, or did not answer: worth another try."""


@shared_task(name="reconciliation.purge_dead_letters", ignore_result=True)
def purge_dead_letters() -> int:
    """Delete dead letters past their retention, and delivered callbacks, delivery buckets and queue
    samples past theirs."""
    buckets_purge(older_than_s=reconciliation_setting("BUCKET_RETENTION_SECONDS"))
    queue_depth_purge(older_than_s=reconciliation_setting("BUCKET_RETENTION_SECONDS"))
    callbacks_purge_expired()
    return dead_letters_purge_expired().total


@shared_task(name="reconciliation.poll_receipts", ignore_result=True)
def poll_receipts() -> int:
    """Look up one batch of dispatched messages whose receipt is overdue (every minute)."""
    return receipts_poll_overdue().polled


@shared_task(name="reconciliation.detect_anomalies", ignore_result=True)
def detect_anomalies() -> int:
    """Recount the delivery buckets, open and resolve alerts (every minute)."""
    return anomalies_detect().opened


@shared_task(name="reconciliation.sample_queues", ignore_result=True)
def sample_queues() -> None:
    """Queue depths for the dashboard's chart (the broker keeps no history)."""
    queue_depth_sample()


@shared_task(name="reconciliation.disable_failing_callback_endpoints", ignore_result=True)
def disable_failing_callback_endpoints() -> int:
    """Disable clients' callback endpoints failing too long, with an alert (every minute)."""
    return len(callback_endpoints_disable_failing().disabled)


@shared_task(name="reconciliation.check_periodic_jobs", ignore_result=True)
def check_periodic_jobs() -> int:
    """Judge the periodic jobs' heartbeats, open and resolve their alerts (every minute). Not the
    only judge: a dead beat runs nothing, so /livez/beat, /metrics and the dashboard judge too."""
    return sum(status.overdue for status in periodic_jobs_check())


@shared_task(name="reconciliation.reconcile", ignore_result=True)
def reconcile() -> None:
    """Reconcile yesterday (UTC) against receipts and the providers (nightly); skipped if one runs."""
    reconciliation_run(day=(timezone.now() - timedelta(days=1)).date(), trigger="beat")


@shared_task(
    name=POST_ALERT_TASK,
    ignore_result=True,
    acks_late=True,
    autoretry_for=(AlertWebhookError,),  # connection errors and timeouts become one (URL redacted)
    retry_backoff=2,
    retry_backoff_max=60,  # no countdown beyond the broker's re-delivery horizon (SPEC §4)
    max_retries=8,
)
def post_alert(payload: dict) -> None:
    """POST one alert event to ALERT_WEBHOOK_URL; retried on connection errors and 5xx."""
    url = reconciliation_setting("ALERT_WEBHOOK_URL")
    if not url:
        return
    # Only the scheme and host are ever logged: a Slack-style URL's path is its secret, and
    # requests' own error messages (which Celery logs on each retry) quote the path.
    shown = redacted_url(url)
    try:
        response = requests.post(url, json=payload, timeout=5, headers={"User-Agent": "conductor-alerts"})
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise AlertWebhookError(f"{shown} did not answer ({type(exc).__name__})") from None
    if response.status_code >= 500:
        raise AlertWebhookError(f"{shown} answered {response.status_code}")
    if response.status_code >= 400:
        logger.error("alert webhook %s refused alert %s: %s", shown, payload.get("id"), response.status_code)
