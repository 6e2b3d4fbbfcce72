"""Periodic jobs' heartbeats: every run of a task beat schedules is recorded, and a job that has not
succeeded for several of its intervals is overdue, with an alert (issue 25: nothing silent in the
safety net: the sweeper, release, polling, detection and retention all run on beat).

Recording is in one place for every job, messaging's too, without those tasks knowing: Celery's
task_prerun/task_postrun signals (connected in ReconciliationConfig.ready), for the task names in
CELERY_BEAT_SCHEDULE only, upsert one PeriodicJobHeartbeat row per task from the worker that ran it.

Judging cannot be left to beat: a dead beat runs no check, and a dead maintenance worker runs none
of its queue. periodic_jobs_check() is called by what beat does not drive: every GET /livez/beat,
the /metrics scrape's database read (Prometheus, every 15 s; at most once per METRICS_CACHE_SECONDS
per web process) and the dashboard's data; and by beat itself (reconciliation.check_periodic_jobs)
for a deployment nobody scrapes. It opens one alert per overdue job and resolves it once the job
succeeds again. Concurrent checks are safe: one open alert per job is a database constraint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from celery import states
from celery.schedules import crontab
from django.db import DatabaseError, IntegrityError, transaction
from django.utils import timezone

from reconciliation.alerts import alert_notify, alert_resolve
from reconciliation.anomalies import AlertKind
from reconciliation.conf import beat_schedule, reconciliation_setting
from reconciliation.models import Alert, AlertSeverity, PeriodicJobHeartbeat

logger = logging.getLogger(__name__)

# An overdue job's alert: channel "beat", provider the task name (Alert.provider holds 100).
ALERT_CHANNEL = "beat"
ALERT_NAME_LENGTH = 100
# A failure's exception kept on the row (type: message), cut to this length.
ERROR_LENGTH = 500


@dataclass(frozen=True)
class PeriodicJob:
    """A task beat runs, as the schedule says."""

    task: str
    queue: str
    interval_seconds: float | None  # None: a schedule whose period cannot be told (never judged overdue)


@dataclass(frozen=True)
class JobStatus:
    """One periodic job judged at `now`."""

    task: str
    queue: str
    interval_seconds: float | None
    overdue_after_seconds: float | None
    registered_at: datetime
    last_started_at: datetime | None
    last_finished_at: datetime | None
    last_success_at: datetime | None
    last_failure_at: datetime | None
    last_error: str
    age_seconds: float  # since the last success, or (never having succeeded) since first expected
    overdue: bool

    @property
    def last_run_failed(self) -> bool:
        return self.last_failure_at is not None and (
            self.last_success_at is None or self.last_failure_at > self.last_success_at
        )

    @property
    def running(self) -> bool:
        """Started and not finished since (or a worker died in it: its success age says which)."""
        return self.last_started_at is not None and (
            self.last_finished_at is None or self.last_started_at > self.last_finished_at
        )

    @property
    def error_type(self) -> str:
        return self.last_error.split(":", 1)[0] if self.last_run_failed else ""

    def as_dict(self, *, error_text: bool = True) -> dict[str, Any]:
        """The JSON of /livez/beat (error_text=False: the exception's type only, as an exception's
        message may quote data) and of the dashboard (staff: the message too)."""
        return {
            "task": self.task,
            "queue": self.queue,
            "interval_seconds": self.interval_seconds,
            "overdue_after_seconds": self.overdue_after_seconds,
            "overdue": self.overdue,
            "age_seconds": round(self.age_seconds, 3),
            "last_success_at": _iso(self.last_success_at),
            "last_started_at": _iso(self.last_started_at),
            "last_finished_at": _iso(self.last_finished_at),
            "registered_at": _iso(self.registered_at),
            "running": self.running,
            "last_run_failed": self.last_run_failed,
            "last_error": (self.last_error if error_text else self.error_type) if self.last_run_failed else "",
        }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


# --- the schedule ------------------------------------------------------------------------------


def schedule_interval_seconds(schedule: Any) -> float | None:
    """How often a beat entry runs: its interval, or for a crontab the longest gap between two runs
    (a daily one's day, a weekdays-only one's weekend); None for a schedule we cannot tell."""
    if isinstance(schedule, crontab):
        return crontab_period_seconds(schedule)
    if isinstance(schedule, bool):
        return None
    if isinstance(schedule, int | float):
        return float(schedule)
    if isinstance(schedule, timedelta):
        return schedule.total_seconds()
    run_every = getattr(schedule, "run_every", None)  # celery.schedules.schedule
    return run_every.total_seconds() if isinstance(run_every, timedelta) else None


def crontab_period_seconds(entry: crontab) -> float | None:
    return _crontab_period(
        tuple(sorted(entry.hour)),
        tuple(sorted(entry.minute)),
        frozenset(entry.day_of_week),
        frozenset(entry.day_of_month),
        frozenset(entry.month_of_year),
    )


@lru_cache(maxsize=64)
def _crontab_period(hours, minutes, days_of_week, days_of_month, months) -> float | None:
    """The longest gap between consecutive runs over two years from a fixed day (UTC, as beat runs:
    CELERY_TIMEZONE). Celery runs a crontab on days matching both its day of month and day of
    week (0 is Sunday)."""
    moments = [hour * 3600 + minute * 60 for hour in hours for minute in minutes]
    if not moments:
        return None
    first = datetime(2024, 1, 1, tzinfo=UTC)
    days = [
        day
        for day in range(731)
        if (date := first + timedelta(days=day)).month in months
        and date.day in days_of_month
        and (date.weekday() + 1) % 7 in days_of_week
    ]
    if not days:
        return None
    longest = max((b - a for a, b in zip(moments, moments[1:], strict=False)), default=0)
    for earlier, later in zip(days, days[1:], strict=False):
        longest = max(longest, (later - earlier) * 86400 + moments[0] - moments[-1])
    return float(longest) or None


def periodic_jobs(schedule: Mapping[str, Mapping[str, Any]]) -> dict[str, PeriodicJob]:
    """The jobs of a beat schedule by task name (a task in two entries: its shorter interval)."""
    jobs: dict[str, PeriodicJob] = {}
    for entry in schedule.values():
        task = entry["task"]
        interval = schedule_interval_seconds(entry.get("schedule"))
        known = jobs.get(task)
        if known is None or (
            interval is not None and (known.interval_seconds is None or interval < known.interval_seconds)
        ):
            queue = (entry.get("options") or {}).get("queue", "")
            jobs[task] = PeriodicJob(task=task, queue=queue, interval_seconds=interval)
    return jobs


_parsed: tuple[object, dict[str, PeriodicJob]] | None = None


def scheduled_jobs() -> dict[str, PeriodicJob]:
    """periodic_jobs() of the settings' schedule, parsed again only when the settings change (the
    signal handlers ask on every task a worker runs)."""
    global _parsed
    schedule = beat_schedule()
    parsed = _parsed
    if parsed is None or parsed[0] is not schedule:
        parsed = _parsed = (schedule, periodic_jobs(schedule))
    return parsed[1]


# --- recording ---------------------------------------------------------------------------------


def periodic_job_started(*, task: str, now: datetime | None = None) -> None:
    now = now or timezone.now()
    _upsert(task, now, last_started_at=now)


def periodic_job_finished(*, task: str, error: str = "", now: datetime | None = None) -> None:
    """A run ended: a success, or (error given) a failure whose exception is kept."""
    now = now or timezone.now()
    if error:
        _upsert(task, now, last_finished_at=now, last_failure_at=now, last_error=error[:ERROR_LENGTH])
    else:
        _upsert(task, now, last_finished_at=now, last_success_at=now)


def _upsert(task: str, now: datetime, **fields: Any) -> None:
    """One INSERT … ON CONFLICT DO UPDATE of the given fields (a new row is registered now)."""
    job = scheduled_jobs().get(task)
    fields["interval_seconds"] = job.interval_seconds if job else None
    PeriodicJobHeartbeat.objects.bulk_create(
        [PeriodicJobHeartbeat(task=task, registered_at=now, **fields)],
        update_conflicts=True,
        unique_fields=["task"],
        update_fields=list(fields),
    )


def _periodic_task_name(task: Any) -> str | None:
    """The task's name if it is one beat schedules and runs on a worker (an eager run, inside a
    caller's transaction, says nothing about beat or the workers)."""
    if task is None or getattr(task.request, "is_eager", False):
        return None
    name = getattr(task, "name", None)
    return name if name in scheduled_jobs() else None


def on_task_prerun(sender: Any = None, task: Any = None, **_: Any) -> None:
    """task_prerun: a periodic job started."""
    name = _periodic_task_name(task or sender)
    if name is not None:
        _record(periodic_job_started, task=name)


def on_task_postrun(
    sender: Any = None, task: Any = None, state: str | None = None, retval: Any = None, **_: Any
) -> None:
    """task_postrun: a periodic job ended, in success or not (its exception is the return value)."""
    name = _periodic_task_name(task or sender)
    if name is None:
        return
    if state == states.SUCCESS:
        _record(periodic_job_finished, task=name)
    else:
        error = f"{type(retval).__name__}: {retval}" if isinstance(retval, BaseException) else f"ended {state}"
        _record(periodic_job_finished, task=name, error=error)


def _record(record, **kwargs: Any) -> None:
    """A heartbeat that cannot be written (the database is down) must not fail the job: it shows
    as the job's age growing, which is the truth about what can be known."""
    try:
        record(**kwargs)
    except DatabaseError as exc:
        logger.warning("heartbeat of %s not recorded: %s", kwargs.get("task"), type(exc).__name__)


# --- judging -----------------------------------------------------------------------------------


def job_status(
    job: PeriodicJob,
    row: PeriodicJobHeartbeat | None,
    *,
    now: datetime,
    overdue_intervals: float,
    grace_seconds: float,
) -> JobStatus:
    """Judge one job at `now` (no row yet: first expected now). Overdue when its last success, or
    never having succeeded its registration, is older than overdue_intervals × interval + grace."""
    registered_at = row.registered_at if row is not None else now
    since = row.last_success_at if row is not None and row.last_success_at else registered_at
    age = max(0.0, (now - since).total_seconds())
    overdue_after = None if job.interval_seconds is None else overdue_intervals * job.interval_seconds + grace_seconds
    return JobStatus(
        task=job.task,
        queue=job.queue,
        interval_seconds=job.interval_seconds,
        overdue_after_seconds=overdue_after,
        registered_at=registered_at,
        last_started_at=row.last_started_at if row else None,
        last_finished_at=row.last_finished_at if row else None,
        last_success_at=row.last_success_at if row else None,
        last_failure_at=row.last_failure_at if row else None,
        last_error=row.last_error if row else "",
        age_seconds=age,
        overdue=overdue_after is not None and age > overdue_after,
    )


def periodic_job_statuses(*, now: datetime | None = None) -> list[JobStatus]:
    """Every scheduled job judged at `now`, read only (a job without a row is first expected now)."""
    return _statuses(now=now or timezone.now(), register=False)


def periodic_jobs_check(*, now: datetime | None = None) -> list[JobStatus]:
    """Judge every scheduled job, registering those never seen, and open or resolve their alerts."""
    now = now or timezone.now()
    statuses = _statuses(now=now, register=True)
    _alerts_follow(statuses, now=now)
    return statuses


def _statuses(*, now: datetime, register: bool) -> list[JobStatus]:
    jobs = scheduled_jobs()
    if register and jobs:
        # Always the one statement (DO NOTHING for the rows that exist): a job's first check
        # starts its clock, so a beat that never ran at all is noticed too.
        PeriodicJobHeartbeat.objects.bulk_create(
            [
                PeriodicJobHeartbeat(task=task, registered_at=now, interval_seconds=job.interval_seconds)
                for task, job in jobs.items()
            ],
            ignore_conflicts=True,
        )
    rows = PeriodicJobHeartbeat.objects.in_bulk(list(jobs))
    intervals = float(reconciliation_setting("PERIODIC_JOB_OVERDUE_INTERVALS"))
    grace = float(reconciliation_setting("PERIODIC_JOB_OVERDUE_GRACE_SECONDS"))
    return [
        job_status(job, rows.get(task), now=now, overdue_intervals=intervals, grace_seconds=grace)
        for task, job in sorted(jobs.items())
    ]


def _alerts_follow(statuses: list[JobStatus], *, now: datetime) -> None:
    open_alerts = {
        alert.provider: alert for alert in Alert.objects.filter(kind=AlertKind.PERIODIC_JOB_OVERDUE, resolved_at=None)
    }
    overdue = [status for status in statuses if status.overdue]
    queues = sorted({status.queue for status in overdue})
    for status in overdue:
        detail = overdue_detail(status, overdue=len(overdue), queues=queues)
        alert = open_alerts.pop(status.task[:ALERT_NAME_LENGTH], None)
        if alert is not None:
            Alert.objects.filter(pk=alert.pk).update(
                last_seen_at=now, window_end=now, observed=status.age_seconds, detail=detail
            )
        else:
            _alert_open(status, detail=detail, now=now)
    for alert in open_alerts.values():  # succeeded since, or no longer scheduled
        alert_resolve(alert=alert, now=now)


def overdue_detail(status: JobStatus, *, overdue: int, queues: list[str]) -> str:
    """An overdue job's alert, in words: how late, what it last did, and where to look."""
    if status.last_success_at is not None:
        since = f"{status.last_success_at:%Y-%m-%d %H:%M:%S} UTC"
        late = f"has not succeeded for {status.age_seconds:.0f} s (since {since})"
    else:
        late = f"has never succeeded in the {status.age_seconds:.0f} s since it was first expected"
    said = f"{status.task} (queue {status.queue or 'default'}) {late}; it runs every {status.interval_seconds:g} s "
    said += f"and is overdue after {status.overdue_after_seconds:g} s."
    if status.last_run_failed:
        said += f" Its last run failed: {status.error_type}."
    elif status.running:
        said += f" A run started at {status.last_started_at:%H:%M:%S} UTC has not ended."
    return (
        f"{said} {overdue} periodic job(s) overdue, on queue(s) {', '.join(q or 'default' for q in queues)}: "
        "jobs of several queues point at beat (or the broker), of one queue at that queue's worker."
    )


def _alert_open(status: JobStatus, *, detail: str, now: datetime) -> Alert | None:
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                kind=AlertKind.PERIODIC_JOB_OVERDUE,
                channel=ALERT_CHANNEL,
                provider=status.task[:ALERT_NAME_LENGTH],
                severity=AlertSeverity.CRITICAL,
                observed=status.age_seconds,
                baseline=status.interval_seconds or 0.0,
                recent_samples=0,
                baseline_samples=0,
                score=0.0,
                window_start=status.last_success_at or status.registered_at,
                window_end=now,
                opened_at=now,
                last_seen_at=now,
                detail=detail,
            )
            transaction.on_commit(lambda: alert_notify(alert=alert, event="opened"))
    except IntegrityError:  # opened meanwhile by a concurrent check
        return None
    return alert
