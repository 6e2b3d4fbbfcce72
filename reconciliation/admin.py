"""Read-only admin for reconciliation runs and alerts: written by the services only."""

from django.contrib import admin

from messaging.admin import ReadOnlyAdmin, timestamp_status_filter
from reconciliation.models import Alert, ReconciliationRun


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(ReadOnlyAdmin):
    list_display = [
        "window_start",
        "status",
        "trigger",
        "checked",
        "looked_up",
        "updated",
        "still_unknown",
        "mismatches",
        "unmatched_receipts",
        "duration_ms",
        "started_at",
    ]
    list_filter = ["status", "trigger"]
    date_hierarchy = "window_start"


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    list_display = [
        "opened_at",
        "kind",
        "error_type",
        "channel",
        "provider",
        "country",
        "severity",
        "observed",
        "baseline",
        "recent_samples",
        "resolved_at",
    ]
    list_filter = [
        timestamp_status_filter("resolved_at", "open", "resolved"),
        "kind",
        "severity",
        "channel",
        "provider",
        "country",
    ]
    date_hierarchy = "opened_at"
