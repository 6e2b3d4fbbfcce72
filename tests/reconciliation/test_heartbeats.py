"""Periodic jobs' heartbeats: recorded from the tasks' own runs, judged overdue after several missed
intervals (an injected clock), an alert per overdue job opened and resolved, and shown on
/livez/beat, /metrics and the dashboard (reconciliation/heartbeats.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery import shared_task
from celery.app.trace import build_tracer
from celery.schedules import crontab, schedule
from django.core.checks import run_checks
from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from conductor_project import metrics
from reconciliation.anomalies import AlertKind
from reconciliation.dashboard import dashboard_data
from reconciliation.heartbeats import (
    PeriodicJob,
    _alert_open,
    job_status,
    periodic_job_finished,
    periodic_job_started,
    periodic_jobs,
    periodic_jobs_check,
    schedule_interval_seconds,
)
from reconciliation.models import Alert, PeriodicJobHeartbeat

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
# Two jobs on two queues, as beat's schedule names them (the real tasks: a worker would run them).
SCHEDULE = {
    "messaging.sweep": {"task": "messaging.sweep", "schedule": 5.0, "options": {"queue": "maintenance"}},
    "messaging.release_due": {"task": "messaging.release_due", "schedule": 1.0, "options": {"queue": "release"}},
}


@pytest.fixture
def two_jobs(settings):
    """The schedule above, overdue after 3 intervals + 2 s: sweep after 17 s, release_due after 5 s."""
    settings.CELERY_BEAT_SCHEDULE = SCHEDULE
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "PERIODIC_JOB_OVERDUE_INTERVALS": 3.0,
        "PERIODIC_JOB_OVERDUE_GRACE_SECONDS": 2.0,
    }


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def open_alerts() -> dict[str, Alert]:
    return {a.provider: a for a in Alert.objects.filter(kind=AlertKind.PERIODIC_JOB_OVERDUE, resolved_at=None)}


# --- the schedule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, seconds",
    [
        (5.0, 5.0),
        (timedelta(minutes=2), 120.0),
        (schedule(timedelta(seconds=30)), 30.0),
        (crontab(hour=2, minute=0), 86400.0),  # the nightly reconciliation
        (crontab(minute=0), 3600.0),
        (crontab(minute="*/15"), 900.0),
        (crontab(hour=9, minute=30, day_of_week="mon-fri"), 3 * 86400.0),  # Friday to Monday
        (crontab(hour=1, minute=0, day_of_month=1), 31 * 86400.0),  # the longest month
        ("every day", None),
    ],
)
def test_a_jobs_interval_is_its_schedule_or_a_crontabs_longest_gap(entry, seconds):
    assert schedule_interval_seconds(entry) == seconds


def test_every_job_of_the_settings_schedule_has_an_interval(settings):
    jobs = periodic_jobs(settings.CELERY_BEAT_SCHEDULE)
    assert {"messaging.sweep", "messaging.release_due", "reconciliation.reconcile"} <= set(jobs)
    assert "reconciliation.check_periodic_jobs" in jobs
    assert all(job.interval_seconds for job in jobs.values())
    assert jobs["reconciliation.reconcile"].interval_seconds == 86400.0
    assert jobs["messaging.release_due"].queue == "release"


# --- judging, on an injected clock -------------------------------------------------------------

SWEEP = PeriodicJob(task="messaging.sweep", queue="maintenance", interval_seconds=5.0)


def test_a_job_is_overdue_after_the_missed_intervals_plus_the_grace():
    row = PeriodicJobHeartbeat(task=SWEEP.task, registered_at=at(-600), last_success_at=at(0))
    judge = lambda now: job_status(SWEEP, row, now=now, overdue_intervals=3, grace_seconds=60)  # noqa: E731
    assert judge(at(75)).overdue_after_seconds == 75
    assert (judge(at(74)).overdue, judge(at(75)).overdue, judge(at(75.5)).overdue) == (False, False, True)
    assert judge(at(75.5)).age_seconds == 75.5


def test_a_job_that_never_succeeded_is_judged_from_when_it_was_first_expected():
    never = PeriodicJobHeartbeat(task=SWEEP.task, registered_at=at(0), last_started_at=at(1))
    status = job_status(SWEEP, never, now=at(76), overdue_intervals=3, grace_seconds=60)
    assert status.overdue and status.age_seconds == 76 and status.last_success_at is None and status.running
    # No row yet: first expected now, so not overdue (a fresh deployment is not an alert).
    unseen = job_status(SWEEP, None, now=at(76), overdue_intervals=3, grace_seconds=60)
    assert (unseen.overdue, unseen.age_seconds, unseen.registered_at) == (False, 0.0, at(76))


def test_a_failing_job_ages_from_its_last_success_and_says_why():
    row = PeriodicJobHeartbeat(
        task=SWEEP.task,
        registered_at=at(-600),
        last_success_at=at(0),
        last_started_at=at(70),
        last_finished_at=at(71),
        last_failure_at=at(71),
        last_error="OperationalError: could not connect to +14155552671's server",
    )
    status = job_status(SWEEP, row, now=at(80), overdue_intervals=3, grace_seconds=60)
    assert status.overdue and status.last_run_failed and not status.running
    assert status.as_dict(error_text=False)["last_error"] == "OperationalError"  # the public view: the type only
    assert "+1415" in status.as_dict()["last_error"]  # staff (the dashboard) see the message


def test_a_job_with_no_known_interval_is_never_overdue():
    job = PeriodicJob(task="x", queue="", interval_seconds=None)
    status = job_status(job, None, now=at(10**6), overdue_intervals=3, grace_seconds=60)
    assert status.overdue_after_seconds is None and not status.overdue


# --- recording ---------------------------------------------------------------------------------


@shared_task(name="tests.heartbeat_job")
def heartbeat_job(fail: bool = False) -> None:
    if fail:
        raise ValueError("the job broke")


def run_as_a_worker_would(task, **kwargs):
    """Celery's own tracer, as a worker runs a task (not eager): the task_prerun/postrun signals fire."""
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task._get_app())
    tracer("a-task-id", [], kwargs, request={})


def test_a_worker_run_of_a_scheduled_task_records_start_finish_and_success(settings, transactional_db):
    settings.CELERY_BEAT_SCHEDULE = {"job": {"task": heartbeat_job.name, "schedule": 30.0}}
    run_as_a_worker_would(heartbeat_job)
    row = PeriodicJobHeartbeat.objects.get(task=heartbeat_job.name)
    assert row.last_started_at <= row.last_finished_at == row.last_success_at
    assert (row.interval_seconds, row.last_failure_at, row.last_error) == (30.0, None, "")
    succeeded = row.last_success_at

    run_as_a_worker_would(heartbeat_job, fail=True)
    row.refresh_from_db()
    assert row.last_success_at == succeeded  # a failure is not a heartbeat of success
    assert row.last_failure_at == row.last_finished_at > succeeded
    assert row.last_error == "ValueError: the job broke"
    assert PeriodicJobHeartbeat.objects.count() == 1  # one row per job, upserted


def test_tasks_beat_does_not_schedule_and_eager_runs_record_nothing(settings, transactional_db):
    settings.CELERY_BEAT_SCHEDULE = {}
    run_as_a_worker_would(heartbeat_job)
    settings.CELERY_BEAT_SCHEDULE = {"job": {"task": heartbeat_job.name, "schedule": 30.0}}
    heartbeat_job.apply()  # eager: inside a caller, not a worker's run
    assert not PeriodicJobHeartbeat.objects.exists()


# --- the check: alerts opened and resolved -----------------------------------------------------


def test_the_check_opens_an_alert_per_overdue_job_and_resolves_it_when_the_job_succeeds(db, two_jobs):
    statuses = periodic_jobs_check(now=at(0))  # both registered: their clocks start
    assert [s.overdue for s in statuses] == [False, False]
    for task in SCHEDULE:
        periodic_job_finished(task=task, now=at(0))

    assert not any(s.overdue for s in periodic_jobs_check(now=at(5)))  # release_due: 5 s is not over 5 s
    periodic_jobs_check(now=at(6))
    [alert] = open_alerts().values()
    assert (alert.channel, alert.provider, alert.severity) == ("beat", "messaging.release_due", "critical")
    assert (alert.observed, alert.baseline, alert.opened_at) == (6.0, 1.0, at(6))
    assert "release_due (queue release) has not succeeded for 6 s" in alert.detail

    periodic_jobs_check(now=at(18))  # now the sweep too; release_due's alert stays the one, refreshed
    alerts = open_alerts()
    assert set(alerts) == {"messaging.release_due", "messaging.sweep"}
    assert alerts["messaging.release_due"].pk == alert.pk and alerts["messaging.release_due"].observed == 18.0
    assert "2 periodic job(s) overdue, on queue(s) maintenance, release" in alerts["messaging.sweep"].detail

    periodic_job_started(task="messaging.release_due", now=at(19))
    periodic_job_finished(task="messaging.release_due", now=at(19.5))
    periodic_jobs_check(now=at(20))
    assert set(open_alerts()) == {"messaging.sweep"}
    assert Alert.objects.get(pk=alert.pk).resolved_at == at(20)


def test_an_overdue_job_taken_off_the_schedule_has_its_alert_resolved(db, two_jobs, settings):
    periodic_jobs_check(now=at(0))
    periodic_jobs_check(now=at(100))
    assert set(open_alerts()) == {"messaging.release_due", "messaging.sweep"}
    settings.CELERY_BEAT_SCHEDULE = {"messaging.sweep": SCHEDULE["messaging.sweep"]}
    periodic_jobs_check(now=at(101))
    assert set(open_alerts()) == {"messaging.sweep"}


def test_two_checks_at_once_open_one_alert(db, two_jobs):
    periodic_jobs_check(now=at(0))
    [overdue, *_] = [s for s in periodic_jobs_check(now=at(100)) if s.overdue]
    assert _alert_open(overdue, detail="again", now=at(100)) is None  # the constraint: one open per job
    assert Alert.objects.filter(kind=AlertKind.PERIODIC_JOB_OVERDUE).count() == 2


# --- where it shows: /livez/beat, /metrics, the dashboard ---------------------------------------


def age_back(seconds: float, **tasks_succeeded_ago: float) -> None:
    """Rows as if each job (release_due=…, sweep=…) last succeeded that many seconds ago."""
    from django.utils import timezone

    now = timezone.now()
    for task in SCHEDULE:
        ago = tasks_succeeded_ago.get(task.split(".")[1], 0.0)
        PeriodicJobHeartbeat.objects.update_or_create(
            task=task,
            defaults={
                "registered_at": now - timedelta(seconds=seconds),
                "last_success_at": now - timedelta(seconds=ago),
            },
        )


def test_livez_beat_answers_200_then_503_naming_the_overdue_jobs(client, db, two_jobs):
    fine = client.get("/livez/beat")
    assert fine.status_code == 200 and fine.json()["status"] == "ok" and fine.json()["overdue"] == []
    assert [job["task"] for job in fine.json()["jobs"]] == ["messaging.release_due", "messaging.sweep"]

    age_back(3600, release_due=30.0, sweep=3.0)
    PeriodicJobHeartbeat.objects.filter(task="messaging.release_due").update(
        last_failure_at=datetime.now(UTC), last_error="IntegrityError: Key (to)=(+14155552671)"
    )
    late = client.get("/livez/beat")
    assert late.status_code == 503
    body = late.json()
    assert body["status"] == "overdue" and body["overdue"] == ["messaging.release_due"]
    release = body["jobs"][0]
    assert release["overdue"] and release["age_seconds"] >= 30 and release["overdue_after_seconds"] == 5.0
    assert release["last_run_failed"] and release["last_error"] == "IntegrityError"  # no data on a public URL
    assert set(open_alerts()) == {"messaging.release_due"}  # the request judged: the alert is open

    PeriodicJobHeartbeat.objects.update(last_success_at=datetime.now(UTC))
    assert client.get("/livez/beat").status_code == 200
    assert open_alerts() == {}


def test_metrics_show_each_jobs_age_interval_and_whether_it_is_overdue(client, db, two_jobs):
    metrics.database_families_cache.clear()
    age_back(3600, release_due=30.0, sweep=3.0)
    text = client.get("/metrics").content.decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}

    def values(name):
        return {sample.labels["task"]: sample.value for sample in families[name].samples}

    ages = values("conductor_periodic_job_last_success_age_seconds")
    assert 30 <= ages["messaging.release_due"] < 40 and 3 <= ages["messaging.sweep"] < 13
    assert values("conductor_periodic_job_interval_seconds") == {"messaging.release_due": 1.0, "messaging.sweep": 5.0}
    assert values("conductor_periodic_job_overdue") == {"messaging.release_due": 1.0, "messaging.sweep": 0.0}
    assert set(open_alerts()) == {"messaging.release_due"}  # the scrape judged too (beat need not run)


def test_the_dashboard_lists_the_periodic_jobs(db, two_jobs, admin_client):
    age_back(3600, release_due=30.0, sweep=3.0)
    rows = {job["task"]: job for job in dashboard_data(window="15m")["periodic_jobs"]}
    assert rows["messaging.release_due"]["overdue"] and not rows["messaging.sweep"]["overdue"]
    assert open_alerts() == {}  # reading the data judges nothing...
    response = admin_client.get("/dashboard/data/?window=15m")
    assert response.status_code == 200 and len(response.json()["periodic_jobs"]) == 2
    assert set(open_alerts()) == {"messaging.release_due"}  # ...the staff's page does


@pytest.mark.parametrize(
    "conductor, expected",
    [
        ({"PERIODIC_JOB_OVERDUE_INTERVALS": 0.5}, ["conductor.E120"]),
        ({"PERIODIC_JOB_OVERDUE_GRACE_SECONDS": -1.0}, ["conductor.E121"]),
        ({"PERIODIC_JOB_OVERDUE_GRACE_SECONDS": "1m"}, ["conductor.E021"]),
    ],
)
def test_overdue_settings_that_cannot_work_are_errors(conductor, expected):
    with override_settings(CONDUCTOR=conductor):
        assert [error.id for error in run_checks() if error.id.startswith("conductor.")] == expected
