"""manage.py drill: take a provider out of live traffic for a few minutes and check its fallback."""

from __future__ import annotations

import getpass
import json
import signal
import sys

from django.core.management.base import BaseCommand, CommandError

from reconciliation.drills import (
    DEFAULT_DURATION_SECONDS,
    DEFAULT_SETTLE_SECONDS,
    MAX_DURATION_SECONDS,
    MIN_DURATION_SECONDS,
    MODES,
    DrillRefused,
    drill_plan,
    drill_run,
)
from reconciliation.models import DrillStatus


def _terminate_as_interrupt(signum, frame):
    # SIGTERM (a deploy, `kill`) ends the drill like Ctrl-C: the provider is restored first.
    raise KeyboardInterrupt


class Command(BaseCommand):
    help = f"""Fallback drill: force a provider's circuit breaker open (or its route degraded) on live
traffic for --duration seconds, watch the messages move to the route's next provider, restore it
(always, also on Ctrl-C), watch --settle seconds more, and store a report (admin: Drills; the
dashboard shows the last one): what moved where, latency before/during/after, messages affected,
lost and doubled. Refuses when the provider is in no route, when the fallback has no healthy
provider, or when another drill is running. Durations: {MIN_DURATION_SECONDS}-{MAX_DURATION_SECONDS}s.

Examples:
  manage.py drill --provider twilio --dry-run
  manage.py drill --provider twilio --duration 300 --yes
  manage.py drill --provider twilio --country GB --mode degraded"""

    def add_arguments(self, parser):
        parser.add_argument("--provider", required=True, help="The provider to take out, e.g. twilio.")
        parser.add_argument("--country", default="", help="Degraded mode only: one destination (ISO code, GB).")
        parser.add_argument(
            "--mode", choices=MODES, default=MODES[0], help="How to take it out (default circuit_open)."
        )
        parser.add_argument("--duration", type=int, default=DEFAULT_DURATION_SECONDS, metavar="SECONDS")
        parser.add_argument(
            "--settle",
            type=int,
            default=DEFAULT_SETTLE_SECONDS,
            metavar="SECONDS",
            help=f"Watched after restoring (default {DEFAULT_SETTLE_SECONDS}).",
        )
        parser.add_argument("--dry-run", action="store_true", help="Say what it would do; change nothing.")
        parser.add_argument("--yes", action="store_true", help="Do not ask before taking the provider out.")
        parser.add_argument("--json", action="store_true", help="Print the stored report as JSON at the end.")

    def handle(self, *args, **options):
        plan = drill_plan(
            provider=options["provider"],
            country=options["country"],
            mode=options["mode"],
            duration_seconds=options["duration"],
            settle_seconds=options["settle"],
        )
        for line in plan.describe():
            self.stdout.write(line)
        if plan.refusals:
            raise CommandError("Refused: " + "; ".join(plan.refusals) + ".")
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing was changed.")
            return
        self._confirm(plan, options)
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
        try:
            drill = drill_run(plan, started_by=f"{getpass.getuser()}@manage.py", progress=self.stdout.write)
        except DrillRefused as exc:
            raise CommandError(f"Refused: {exc}.") from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        if options["json"]:
            self.stdout.write(json.dumps(drill.report, indent=2))
        style = self.style.SUCCESS if drill.status == DrillStatus.PASSED else self.style.ERROR
        self.stdout.write(style(f"Drill {drill.pk}: {drill.summary}"))
        if drill.status != DrillStatus.PASSED:
            raise CommandError(f"Drill {drill.pk} {drill.status}; see its report in the admin (Drills).")

    def _confirm(self, plan, options) -> None:
        if options["yes"]:
            return
        if not sys.stdin.isatty():
            raise CommandError("This takes a provider out of live traffic; add --yes to confirm.")
        answer = input(f"Take {plan.provider} out of live traffic for {plan.duration_seconds}s now? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError("Nothing done.")
