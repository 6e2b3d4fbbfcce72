"""The Celery app; configuration comes from Django settings under the CELERY_ namespace."""

import os
import sys

from celery import Celery
from celery.signals import beat_init, task_postrun, task_prerun, worker_init

from conductor_project import kombu_fixes

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "conductor_project.settings.base")
# Before any connection exists: kombu 5.7's Redis transport can otherwise kill a worker when Redis
# restarts (conductor_project/kombu_fixes.py; docs/operations.md, "Broker restarts").
kombu_fixes.apply()

app = Celery("conductor")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_init.connect
@beat_init.connect
def _refuse_to_start_on_errors(sender=None, **_) -> None:
    """A worker or beat with settings `manage.py check` refuses does not start either (a
    SystemExit: Celery logs any other exception from a signal handler and goes on)."""
    from django.core.management.base import SystemCheckError

    from conductor_project.checks import refuse_to_start_on_errors

    try:
        refuse_to_start_on_errors("Celery")
    except SystemCheckError as exc:
        print(exc, file=sys.stderr, flush=True)
        raise SystemExit(1) from exc


@beat_init.connect
def _beat_stops_between_ticks(sender=None, **_) -> None:
    """SIGTERM and SIGINT ask beat's loop to stop after its tick (at most a second here).

    Celery's own handler raises SystemExit wherever beat is. Beat publishes release_due every
    second, so that is often inside a publish, where redis-py turns it into "I/O operation on
    closed file", an error Scheduler.apply_entry logs before ticking on: beat ignored the signal
    until supervisord's or systemd's SIGKILL (half of `make run`'s stops, tests/integration/
    test_make_run.py). Service.stop() sets the flag the loop checks; the loop then saves the
    schedule and returns as after Celery's SystemExit."""
    from celery import platforms

    def stop(signum, frame) -> None:
        sender.stop()

    platforms.signals.update(SIGTERM=stop, SIGINT=stop)


@task_prerun.connect
@task_postrun.connect
def _database_connections_between_tasks(sender=None, **_) -> None:
    """Django's rule between requests, applied between tasks: a connection is kept for
    CONN_MAX_AGE and dropped once broken (CONN_HEALTH_CHECKS) or obsolete.

    Celery (5.7 here; since celery#9824, 2025) closes every connection around every task unless
    CELERY_DB_REUSE_MAX is set, so each task opened a new PostgreSQL connection and backend: one
    per bulk batch, one per critical message (bench/README.md, third session: 339 connections
    for a 20,000-message bench run, 17 with this). Settings set CELERY_DB_REUSE_MAX high, and
    this does what Celery's fixup no longer does. Eager tasks (tests) run inside the caller's
    transaction and are left alone, as Celery's own fixup leaves them.
    """
    if sender is not None and getattr(sender.request, "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()
