"""manage.py reconcile: reconcile one day's sends against receipts and the providers, by hand."""

from __future__ import annotations

import getpass
import sys
from datetime import date, timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from reconciliation.reconcile import reconciliation_run


class Command(BaseCommand):
    help = (
        "Reconcile the messages dispatched on one day (UTC; default yesterday) against the receipts we "
        "received and the providers' own status: what a provider knows that we never heard (a lost "
        "receipt) is applied; disagreements are counted. The report is stored (admin: Reconciliation "
        "runs). Beat runs the same every night (CONDUCTOR_RECONCILE_AT, default 02:00). Only one run at "
        "a time; running a day again is safe."
    )

    def add_arguments(self, parser):
        parser.add_argument("--date", help="The day to reconcile, YYYY-MM-DD (UTC). Default: yesterday.")

    def handle(self, *args, date: str | None, **options):
        day = self._day(date)
        bar = tqdm(desc=f"reconciling {day}", unit="msg", file=sys.stderr, disable=None)

        def started(total: int) -> None:
            bar.reset(total=total)

        with bar, logging_redirect_tqdm():
            run = reconciliation_run(
                day=day, trigger=f"{getpass.getuser()}@manage.py", progress=bar.update, on_start=started
            )
        if run is None:
            raise CommandError("Another reconciliation is running; nothing was done. Try again when it finishes.")
        mismatches = ", ".join(f"{kind} {n}" for kind, n in sorted(run.mismatches.items())) or "none"
        self.stdout.write(
            self.style.SUCCESS(f"Reconciled {day} (run {run.pk}, {run.duration_ms} ms):")
            + f"\n  checked        {run.checked}"
            + f"\n  looked up      {run.looked_up}  (no final receipt: asked the provider)"
            + f"\n  updated        {run.updated}"
            + f"\n  still unknown  {run.still_unknown}"
            + f"\n  mismatches     {mismatches}"
            + f"\n  unmatched receipts {run.unmatched_receipts} ({run.rematched_receipts} matched now)"
        )

    @staticmethod
    def _day(text: str | None) -> date:
        if not text:
            return (timezone.now() - timedelta(days=1)).date()
        try:
            day = parse_date(text)
        except ValueError:
            day = None
        if day is None:
            raise CommandError(f"--date {text!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-29.")
        return day
