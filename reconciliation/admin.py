"""Read-only admin for reconciliation runs, alerts, drills and periodic jobs' heartbeats: written by
the services only."""

import json

from django.contrib import admin
from django.core.serializers.json import DjangoJSONEncoder
from django.utils.html import format_html, format_html_join

from messaging.admin import ReadOnlyAdmin, timestamp_status_filter
from reconciliation.models import Alert, Drill, PeriodicJobHeartbeat, ReconciliationRun


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


@admin.register(PeriodicJobHeartbeat)
class PeriodicJobHeartbeatAdmin(ReadOnlyAdmin):
    """When each job beat runs last started, finished and succeeded (/livez/beat judges them)."""

    list_display = ["task", "interval_seconds", "last_success_at", "last_started_at", "last_failure_at", "last_error"]
    ordering = ["task"]


WINDOWS = ("before", "during", "after")
LATENCIES = (("accepted_to_dispatched", "accepted → dispatched"), ("dispatched_to_delivered", "dispatched → delivered"))


@admin.register(Drill)
class DrillAdmin(ReadOnlyAdmin):
    """Fallback drills (`manage.py drill`): the answer to "when did you last test your fallback paths?"."""

    list_display = ["started_at", "provider", "country", "mode", "status", "duration_seconds", "affected", "started_by"]
    list_filter = ["status", "provider", "mode"]
    date_hierarchy = "started_at"
    fields = [
        "provider",
        "country",
        "mode",
        "status",
        "started_by",
        "started_at",
        "ended_at",
        "duration_seconds",
        "summary",
        "windows_table",
        "checks",
        "report_json",
    ]
    readonly_fields = fields

    @admin.display(description="Messages affected")
    def affected(self, drill: Drill):
        return drill.report.get("affected", "-")

    @admin.display(description="Before / during / after")
    def windows_table(self, drill: Drill):
        report = drill.report
        if "moved" not in report:
            return "-"
        providers = sorted({p for window in WINDOWS for p in report["moved"].get(window, {})})
        rows = [("window", "from", "to", "accepted", *(f"sent via {p}" for p in providers))]
        for window in WINDOWS:
            span = report.get("windows", {}).get(window, {})
            latency = report.get("latency", {}).get(window, {})
            cells = [
                window,
                span.get("start", "")[11:19],
                span.get("end", "")[11:19],
                report.get("accepted", {}).get(window, 0),
                *(report["moved"].get(window, {}).get(p, 0) for p in providers),
            ]
            for kind, _ in LATENCIES:
                q = latency.get(kind, {})
                cells.append(f"{_seconds(q.get('p50'))} / {_seconds(q.get('p95'))}")
            rows.append(tuple(cells))
        rows[0] = (*rows[0], *(f"{label} p50 / p95" for _, label in LATENCIES))
        head = format_html_join("", "<th>{}</th>", ((cell,) for cell in rows[0]))
        body = format_html_join(
            "", "<tr>{}</tr>", ((format_html_join("", "<td>{}</td>", ((c,) for c in row)),) for row in rows[1:])
        )
        return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)

    @admin.display(description="Checks")
    def checks(self, drill: Drill):
        checks = drill.report.get("checks", {})
        if not checks:
            return "-"
        return format_html(
            "<ul>{}</ul>{}",
            format_html_join(
                "",
                "<li>{}: {}</li>",
                ((name.replace("_", " "), "ok" if ok else "FAILED") for name, ok in checks.items()),
            ),
            format_html(
                "lost: {} · doubled: {} · waiting for a retry: {} · refused for the recipient: {}",
                drill.report.get("lost", 0),
                drill.report.get("doubled", 0),
                drill.report.get("waiting_for_retry", 0),
                drill.report.get("refused_for_recipient", 0),
            ),
        )

    @admin.display(description="Report")
    def report_json(self, drill: Drill):
        return format_html("<pre>{}</pre>", json.dumps(drill.report, indent=2, cls=DjangoJSONEncoder))


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}s"
