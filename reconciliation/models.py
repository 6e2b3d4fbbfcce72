"""Reconciliation's records: delivery buckets, queue depths, alerts, reconciliation runs, drills and
the periodic jobs' heartbeats."""

from __future__ import annotations

from django.db import models


class DeliveryBucket(models.Model):
    """Counts per channel, provider and time bucket, kept for anomaly detection (and the dashboard).

    A bucket holds a cohort, the messages dispatched in it, with how many of them got a receipt
    (and a delivered one) within the receipt maturity; and the provider calls that ended in it,
    with their errors by type and their latency.
    """

    channel = models.CharField(max_length=16)
    provider = models.CharField(max_length=32)
    # "": every destination (the provider-wide cohort, with attempts and latency). A country's
    # (ISO alpha-2 of the recipient, messaging.route_health.recipient_country) holds only its
    # cohort counts, for detection by destination (issue 24); the dashboard reads the "" rows.
    country = models.CharField(max_length=2, blank=True, default="")
    seconds = models.PositiveIntegerField(help_text="The bucket's length.")
    start = models.DateTimeField()
    dispatched = models.PositiveIntegerField(default=0)
    receipted = models.PositiveIntegerField(default=0)
    delivered = models.PositiveIntegerField(default=0)
    undelivered = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=0)
    errors = models.JSONField(default=dict, help_text="Failed provider calls by error type.")
    latency_count = models.PositiveIntegerField(default=0)
    latency_sum_ms = models.FloatField(default=0.0)
    latency_sumsq_ms = models.FloatField(default=0.0)
    dispatch_latency = models.JSONField(
        default=dict,
        help_text="Accepted to dispatched: counts per latency bound (reconciliation.histograms), by priority.",
    )
    delivery_latency = models.JSONField(
        default=dict,
        help_text="Accepted to delivered, for cohort messages delivered within the receipt maturity, by priority.",
    )
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["channel", "provider", "country", "seconds", "start"], name="bucket_unique_slot"
            ),
        ]
        indexes = [models.Index(fields=["seconds", "start"], name="bucket_seconds_start")]

    def __str__(self) -> str:
        where = f"/{self.country}" if self.country else ""
        return f"{self.channel}/{self.provider}{where} {self.start:%Y-%m-%d %H:%M:%S} ({self.seconds}s)"


class QueueDepth(models.Model):
    """The deepest each Celery queue was (ready tasks) within a minute or an hour, sampled by beat."""

    seconds = models.PositiveIntegerField(help_text="The slot's length: 60 or 3600.")
    start = models.DateTimeField()
    depths = models.JSONField(default=dict, help_text="Queue name to the largest depth sampled in the slot.")
    samples = models.PositiveIntegerField(default=0)
    updated_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["seconds", "start"], name="queue_depth_unique_slot")]

    def __str__(self) -> str:
        return f"queues {self.start:%Y-%m-%d %H:%M} ({self.seconds}s)"


class AlertSeverity(models.TextChoices):
    WARNING = "warning"
    CRITICAL = "critical"


class Alert(models.Model):
    """A delivery anomaly: opened by the detector, resolved by it when the rate recovers. Or a
    client's callback endpoint disabled after failing too long (reconciliation.callbacks), resolved
    once it is enabled again or deleted. Or a periodic job overdue (reconciliation.heartbeats:
    channel "beat", provider the job's task name), resolved once it succeeds again."""

    kind = models.CharField(max_length=32)  # reconciliation.anomalies.AlertKind
    error_type = models.CharField(max_length=32, blank=True, default="")
    channel = models.CharField(max_length=16)
    # 100: a periodic job's task name, e.g. reconciliation.disable_failing_callback_endpoints.
    provider = models.CharField(max_length=100)
    # The destination country whose own cohort showed it (issue 24); "": the provider-wide cohort.
    country = models.CharField(max_length=2, blank=True, default="")
    severity = models.CharField(max_length=16, choices=AlertSeverity.choices)
    observed = models.FloatField(help_text="The rate (or mean latency, ms) in the window that showed it.")
    baseline = models.FloatField(help_text="The rate (or mean latency, ms) before: recovery is judged against it.")
    recent_samples = models.PositiveIntegerField()
    baseline_samples = models.PositiveIntegerField()
    score = models.FloatField(help_text="How sure (z); the threshold is CONDUCTOR['ANOMALY']['z_threshold'].")
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    opened_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    recovered_rate = models.FloatField(null=True, blank=True)
    detail = models.TextField(blank=True, default="", help_text="What happened, in words (callback endpoints).")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "error_type", "channel", "provider", "country"],
                condition=models.Q(resolved_at__isnull=True),
                name="alert_one_open_per_signal",
            ),
        ]
        indexes = [models.Index(fields=["-opened_at"], name="alert_opened")]

    def __str__(self) -> str:
        what = f"{self.kind}:{self.error_type}" if self.error_type else self.kind
        where = f"/{self.country}" if self.country else ""
        return f"{what} on {self.channel}/{self.provider}{where} ({'open' if self.resolved_at is None else 'resolved'})"

    @property
    def is_open(self) -> bool:
        return self.resolved_at is None


class RunStatus(models.TextChoices):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class ReconciliationRun(models.Model):
    """One reconciliation of a day's sends against receipts and the providers' own status."""

    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    trigger = models.CharField(max_length=32, help_text="beat, or who ran manage.py reconcile.")
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.RUNNING)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    checked = models.PositiveIntegerField(default=0, help_text="Messages sent in the window.")
    looked_up = models.PositiveIntegerField(
        default=0, help_text="Of those, asked at their provider (no final receipt)."
    )
    updated = models.PositiveIntegerField(default=0, help_text="Moved on by what the provider said.")
    still_unknown = models.PositiveIntegerField(default=0, help_text="The provider has no final status either.")
    mismatches = models.JSONField(default=dict, help_text="Disagreements by kind.")
    unmatched_receipts = models.PositiveIntegerField(default=0, help_text="Receipts in the window naming no message.")
    rematched_receipts = models.PositiveIntegerField(default=0, help_text="Unmatched receipts matched by this run.")
    error = models.TextField(blank=True, default="")

    class Meta:
        indexes = [models.Index(fields=["-started_at"], name="reconciliation_started")]

    def __str__(self) -> str:
        return f"reconciliation of {self.window_start:%Y-%m-%d} ({self.status})"


class DrillStatus(models.TextChoices):
    RUNNING = "running"
    PASSED = "passed"  # traffic moved to the fallback, nothing lost or doubled, restored
    FAILED = "failed"  # something was lost, doubled, or did not move: see the report
    ABORTED = "aborted"  # stopped before its end (refused, interrupted); the provider restored


class Drill(models.Model):
    """A fallback drill (`manage.py drill`, issue 24): one provider forced out of live traffic for
    a few minutes while the traffic's path, latency and outcome are watched; its stored report is
    the answer to "when did you last test your fallback paths?"."""

    provider = models.CharField(max_length=32)
    country = models.CharField(max_length=2, blank=True, default="")
    mode = models.CharField(max_length=16, help_text="How the provider was taken out: circuit_open or degraded.")
    status = models.CharField(max_length=16, choices=DrillStatus.choices, default=DrillStatus.RUNNING)
    started_by = models.CharField(max_length=150, blank=True, default="")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    duration_seconds = models.PositiveIntegerField()
    report = models.JSONField(default=dict, blank=True, help_text="What moved where, latency before/during/after.")
    summary = models.TextField(blank=True, default="")

    class Meta:
        indexes = [models.Index(fields=["-started_at"], name="drill_started")]

    def __str__(self) -> str:
        return f"drill {self.provider} {self.started_at:%Y-%m-%d %H:%M} ({self.status})"


class PeriodicJobHeartbeat(models.Model):
    """When one periodic job (a task beat runs) last started, finished and succeeded: one row per
    task, upserted by the worker that runs it (reconciliation.heartbeats). In PostgreSQL rather
    than Redis so that a Redis restart (the broker's) does not make every job look overdue, and so
    that the web can judge it with the same query it uses for everything else."""

    task = models.CharField(max_length=200, primary_key=True)
    # When the job was first expected (its row's creation): a job that never succeeded is judged
    # from here, so a beat that never started is noticed too.
    registered_at = models.DateTimeField()
    interval_seconds = models.FloatField(
        null=True, blank=True, help_text="The schedule's interval (a crontab's longest gap) where the job last ran."
    )
    last_started_at = models.DateTimeField(null=True, blank=True)
    last_finished_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_failure_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="", help_text="The last failure's exception (type: message).")

    def __str__(self) -> str:
        return f"heartbeat of {self.task}"
