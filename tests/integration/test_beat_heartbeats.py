"""A stopped beat is noticed (issue 25, "nothing silent in the safety net"): a real beat and a
maintenance worker record every periodic job's heartbeats; beat is then killed by its pid and,
with nothing beat drives left to judge, the web does: /livez/beat answers 503 naming the jobs, the
ages on /metrics grow, an alert opens per job; beat started again, they resolve."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from django.conf import settings

from reconciliation.anomalies import AlertKind
from reconciliation.models import Alert, PeriodicJobHeartbeat
from tests.support.processes import http_ok, wait_until
from tests.support.stack import Stack

pytestmark = pytest.mark.integration

# Every interval job of the schedule every one or two seconds; overdue after two missed intervals
# plus 3 s (5 s for the one-second jobs, 7 s for the others). The nightly reconciliation keeps its
# crontab: a day's period, never overdue here.
FAST_SCHEDULE = {
    "CONDUCTOR_SWEEP_INTERVAL_SECONDS": "1",
    "CONDUCTOR_RELEASE_INTERVAL_SECONDS": "1",
    "CONDUCTOR_QUEUE_SAMPLE_INTERVAL_SECONDS": "1",
    "CONDUCTOR_DLQ_PURGE_INTERVAL_SECONDS": "2",
    "CONDUCTOR_RECEIPT_POLL_INTERVAL_SECONDS": "2",
    "CONDUCTOR_ANOMALY_INTERVAL_SECONDS": "2",
    "CONDUCTOR_CALLBACK_ENDPOINT_CHECK_INTERVAL_SECONDS": "2",
    "CONDUCTOR_PERIODIC_JOB_CHECK_INTERVAL_SECONDS": "2",
    "CONDUCTOR_PERIODIC_JOB_OVERDUE_INTERVALS": "2",
    "CONDUCTOR_PERIODIC_JOB_OVERDUE_GRACE_SECONDS": "3",
}
INTERVAL_JOBS = {
    "messaging.sweep",
    "messaging.release_due",
    "reconciliation.sample_queues",
    "reconciliation.purge_dead_letters",
    "reconciliation.poll_receipts",
    "reconciliation.detect_anomalies",
    "reconciliation.disable_failing_callback_endpoints",
    "reconciliation.check_periodic_jobs",
}
NIGHTLY = "reconciliation.reconcile"


@pytest.fixture
def beat_stack(transactional_db, no_stack_beat, request):
    """Redis, web, beat and one worker of the maintenance and release queues (as the Procfile's),
    on the fast schedule: nothing else (no provider is called)."""
    stack = Stack(settings.DATABASES["default"]["NAME"])
    stack.env.update(FAST_SCHEDULE)
    try:
        stack.start_redis()
        stack.start_web()
        stack.start_beat()
        stack.start_worker(concurrency=2, queues="maintenance,release")
        wait_until(lambda: http_ok(f"{stack.web_url}/healthz"), 30, what="web")
        yield stack
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(stack.logs())
    finally:
        # Beat, worker and web at once (each takes seconds to stop), then Redis.
        others = [process for process in stack.processes if process is not getattr(stack, "redis", None)]
        with ThreadPoolExecutor(max(1, len(others))) as pool:
            list(pool.map(lambda process: process.stop(), others))
        stack.stop()


def livez(stack: Stack) -> tuple[int, dict]:
    response = requests.get(f"{stack.web_url}/livez/beat", timeout=10)
    return response.status_code, response.json()


def ages(stack: Stack) -> dict[str, float]:
    """conductor_periodic_job_last_success_age_seconds by task, from the web's /metrics."""
    text = requests.get(f"{stack.web_url}/metrics", timeout=10).text
    prefix = 'conductor_periodic_job_last_success_age_seconds{task="'
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def open_alerts() -> set[str]:
    return set(
        Alert.objects.filter(kind=AlertKind.PERIODIC_JOB_OVERDUE, resolved_at=None).values_list("provider", flat=True)
    )


def test_a_killed_beat_is_named_by_livez_measured_on_metrics_alerted_and_resolved_once_back(beat_stack):
    # 1. Beat and the worker record each job's runs; nothing is overdue.
    def every_job_succeeded() -> bool:
        status, body = livez(beat_stack)
        jobs = {job["task"]: job for job in body["jobs"]}
        return status == 200 and all(jobs[task]["last_success_at"] for task in INTERVAL_JOBS)

    wait_until(every_job_succeeded, 40, interval=0.5, what="a success of every interval job")
    rows = PeriodicJobHeartbeat.objects.in_bulk()
    assert INTERVAL_JOBS | {NIGHTLY} <= set(rows)
    assert rows["messaging.sweep"].interval_seconds == 1.0 and rows[NIGHTLY].interval_seconds == 86400.0
    assert all(rows[task].last_started_at and rows[task].last_error == "" for task in INTERVAL_JOBS)
    assert rows[NIGHTLY].last_success_at is None  # registered by the first check, never run
    assert open_alerts() == set()

    # 2. Beat dies (SIGKILL by pid): the worker is alive and idle, the web judges on every request.
    beat_stack.stop_beat(kill=True)

    def every_interval_job_overdue() -> bool:
        status, body = livez(beat_stack)
        return status == 503 and set(body["overdue"]) == INTERVAL_JOBS

    wait_until(every_interval_job_overdue, 30, interval=0.5, what="/livez/beat naming every interval job")
    status, body = livez(beat_stack)
    assert status == 503 and body["status"] == "overdue" and NIGHTLY not in body["overdue"]
    for job in body["jobs"]:
        if job["task"] in INTERVAL_JOBS:
            assert job["age_seconds"] > job["overdue_after_seconds"] == 2 * job["interval_seconds"] + 3, job
    assert open_alerts() == INTERVAL_JOBS  # one alert per job, opened by the web's checks
    assert beat_stack.workers[0].alive()
    # Beat's lateness is its own endpoint: the load balancer's /readyz stays about the web itself.
    assert requests.get(f"{beat_stack.web_url}/readyz", timeout=10).status_code == 200

    first = ages(beat_stack)
    wait_until(lambda: all(ages(beat_stack)[t] >= first[t] + 1 for t in INTERVAL_JOBS), 10, what="the ages to grow")

    # 3. Beat back: each job runs again and every alert resolves.
    beat_stack.start_beat()
    wait_until(lambda: livez(beat_stack)[0] == 200, 45, interval=0.5, what="/livez/beat 200 with beat back")
    assert open_alerts() == set()
    resolved = Alert.objects.filter(kind=AlertKind.PERIODIC_JOB_OVERDUE)
    assert {alert.provider for alert in resolved} == INTERVAL_JOBS and all(a.resolved_at for a in resolved)
    assert all(age < 10 for task, age in ages(beat_stack).items() if task in INTERVAL_JOBS)
