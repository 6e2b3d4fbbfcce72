"""manage.py purge_dead_letters: run the dead letter retention job by hand (see what it would remove)."""

from __future__ import annotations

from datetime import timedelta

from django.core.management.base import BaseCommand
from django.utils import timezone

from reconciliation.conf import reconciliation_setting
from reconciliation.retention import callbacks_purge_expired, dead_letters_purge_expired, retention_groups


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} s"


class Command(BaseCommand):
    help = (
        "Delete dead letters older than their retention (per priority, and per category where "
        "CONDUCTOR['CATEGORY_POLICIES'] sets dlq_retention_seconds). Beat runs the same job every hour "
        "(CONDUCTOR_DLQ_PURGE_INTERVAL_SECONDS). The messages stay; only their parked context goes. "
        "Status callbacks done with (delivered, or given up on with no dead letter left) go after "
        "CONDUCTOR_CALLBACK_RETENTION_SECONDS (7 days)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dry-run", action="store_true", help="Count what would be removed; delete nothing.")

    def handle(self, *args, dry_run: bool, **options):
        now = timezone.now()
        self.stdout.write("Retention now in force:")
        for priority, category, cutoff, _rows in retention_groups(now=now):
            scope = "every other category" if category == "*" else f"category {category!r}"
            self.stdout.write(f"  {priority:<13} {scope:<28} {_span(now - cutoff)}")
        report = dead_letters_purge_expired(now=now, dry_run=dry_run)
        verb = "Would remove" if dry_run else "Removed"
        noun = "dead letter" if report.total == 1 else "dead letters"
        detail = ", ".join(
            f"{priority}/{'other' if category == '*' else category} {n}"
            for (priority, category), n in sorted(report.removed.items())
        )
        self.stdout.write(f"{verb} {report.total} {noun}" + (f": {detail}." if detail else "."))
        retention = timedelta(seconds=reconciliation_setting("CALLBACK_RETENTION_SECONDS"))
        callbacks = callbacks_purge_expired(now=now, dry_run=dry_run)
        self.stdout.write(
            f"{verb} {callbacks} status callback{'' if callbacks == 1 else 's'} written over {_span(retention)} ago "
            "(delivered, or given up on with no dead letter left)."
        )
