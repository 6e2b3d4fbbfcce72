"""manage.py replay_dead_letters: select dead letters by filter and send them again, once each."""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

from django.core.management.base import BaseCommand, CommandError, DjangoHelpFormatter
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from messaging.api.serializers import parse_dead_letter_id
from messaging.models import ERROR_TYPE_MEANINGS, ApiClient, DeadLetter, DeadLetterKind, ErrorType, EventSource
from messaging.replay import SkipReason, dead_letters_replay
from messaging.routing import Channel, Priority
from messaging.selectors import DeadLetterCriteria, dead_letters_matching
from messaging.states import DEAD_LETTER_STATES

DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Above this many, a replay asks before it starts (or needs --yes when no one can answer).
CONFIRM_ABOVE = 100


def parse_when(value: str, *, now: datetime) -> datetime:
    """'2h', '1d12h', '90m' (that long before now) or an ISO 8601 timestamp or date (UTC if naive)."""
    text = value.strip().lower()
    if DURATION.fullmatch(text):
        seconds = sum(float(amount) * UNIT_SECONDS[unit] for amount, unit in DURATION_PART.findall(text))
        return now - timedelta(seconds=seconds)
    try:
        moment = parse_datetime(value.strip())
        if moment is None and (day := parse_date(value.strip())) is not None:
            moment = datetime(day.year, day.month, day.day)
    except ValueError:  # well formed but impossible, e.g. month 13
        moment = None
    if moment is None:
        raise ValueError(f"{value!r} is neither a duration (30m, 2h, 1d12h, 1w) nor a timestamp (2026-11-30T08:00Z)")
    return moment if timezone.is_aware(moment) else moment.replace(tzinfo=UTC)


class HelpFormatter(DjangoHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Django's option order, with the description and the error-type list kept as written."""


class Command(BaseCommand):
    help = """Replay dead letters: send messages that were given up on (retries spent, refused, expired,
worker lost) again, each once, with a new send generation and a fresh retry budget.

Filters narrow the selection (each may be repeated); with no filter, --all is required. Only
parked dead letters (not replayed yet) are selected, oldest first. A message whose deadline was
set by its sender, or whose policy keeps it (critical by default), is skipped once that deadline
has passed unless --force. A send whose outcome was unknown is looked up at its provider before
it is sent again. Two replays running at once never send a message twice.

Status callbacks given up on are dead letters of kind "callback" (--kind callback): a replay makes
the callback pending again with a fresh retry window and the same webhook-id; one whose endpoint
is disabled is skipped (enable the endpoint first).

Examples:
  manage.py replay_dead_letters --since 2h --channel sms --error-type provider_timeout --dry-run
  manage.py replay_dead_letters --id 1842 --id 3f0c6a52-4d1e-4c8a-9a53-0d2b1c1c9e11
  manage.py replay_dead_letters --provider twilio --since 2026-11-30T08:00Z --until 2026-11-30T09:30Z --yes
  manage.py replay_dead_letters --kind callback --endpoint 12 --since 1d"""

    def create_parser(self, prog_name, subcommand, **kwargs):
        meanings = "\n".join(f"  {name:<18} {ERROR_TYPE_MEANINGS[name]}" for name in ErrorType.values)
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("epilog", f"Error types:\n{meanings}")
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser):
        when = "a duration before now (30m, 2h, 1d) or an ISO 8601 timestamp"
        parser.add_argument("--since", metavar="WHEN", help=f"Parked at or after this: {when}.")
        parser.add_argument("--until", metavar="WHEN", help=f"Parked before this: {when}.")
        parser.add_argument("--channel", action="append", choices=Channel.values, default=[])
        parser.add_argument("--provider", action="append", default=[], help="The last provider tried, e.g. twilio.")
        parser.add_argument(
            "--error-type", action="append", choices=ErrorType.values, default=[], metavar="TYPE", help="See below."
        )
        parser.add_argument("--category", action="append", default=[], help="The sender's category, e.g. otp.")
        parser.add_argument("--priority", action="append", choices=Priority.values, default=[])
        parser.add_argument("--state", action="append", choices=sorted(DEAD_LETTER_STATES), default=[])
        parser.add_argument("--client", action="append", default=[], help="Only this API client's (its name).")
        parser.add_argument(
            "--kind", action="append", choices=DeadLetterKind.values, default=[], help="Messages or status callbacks."
        )
        parser.add_argument(
            "--endpoint", action="append", type=int, default=[], metavar="ID", help="Callbacks to this endpoint (id)."
        )
        parser.add_argument(
            "--id",
            action="append",
            default=[],
            dest="ids",
            metavar="ID",
            help="A dead-letter id (number) or a message id (UUID).",
        )
        parser.add_argument("--limit", type=int, metavar="N", help="Replay at most this many (the oldest first).")
        parser.add_argument("--all", action="store_true", help="Select every parked dead letter (no filter needed).")
        parser.add_argument("--dry-run", action="store_true", help="Show what would be replayed; change nothing.")
        parser.add_argument(
            "--force", action="store_true", help="Replay even past a kept deadline, or when a receipt says it arrived."
        )
        parser.add_argument(
            "--yes", action="store_true", help=f"Do not ask before replaying more than {CONFIRM_ABOVE}."
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON report instead of text (for scripts).")
        parser.add_argument(
            "--show", type=int, default=20, metavar="N", help="Matched dead letters to list (default 20)."
        )

    def handle(self, *args, **options):
        criteria = self._criteria(options)
        if not criteria.narrows() and not options["all"]:
            raise CommandError("Give at least one filter (--since, --channel, --error-type, --id, ...) or --all.")
        if options["limit"] is not None and options["limit"] < 1:
            raise CommandError("--limit must be at least 1.")
        matching = dead_letters_matching(criteria=criteria)
        matched = matching.count()
        selection = matching[: options["limit"]] if options["limit"] else matching
        selected = min(matched, options["limit"] or matched)
        if not options["json"]:
            self._describe(selection, matched, selected, options["show"])
        if selected and not options["dry_run"]:
            self._confirm(selected, options)
        bar = tqdm(
            total=selected,
            desc="replaying",
            unit="msg",
            file=sys.stderr,
            disable=options["dry_run"] or options["json"] or None,  # None: only on a terminal
        )
        with bar, logging_redirect_tqdm():  # log lines print above the bar, not through it
            report = dead_letters_replay(
                selection=selection,
                actor=f"{getpass.getuser()}@manage.py",
                via=EventSource.COMMAND,
                force=options["force"],
                dry_run=options["dry_run"],
                progress=bar.update,
            )
        if options["json"]:
            self.stdout.write(json.dumps({**report.as_dict(), "matched": matched}, indent=2))
            return
        self._summarise(report, matched, options)

    def _criteria(self, options) -> DeadLetterCriteria:
        now = timezone.now()
        try:
            since = parse_when(options["since"], now=now) if options["since"] else None
            until = parse_when(options["until"], now=now) if options["until"] else None
            ids = tuple(parse_dead_letter_id(value) for value in options["ids"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if since and until and since >= until:
            raise CommandError(
                f"--since ({since:%Y-%m-%d %H:%M:%S}) must be before --until ({until:%Y-%m-%d %H:%M:%S})."
            )
        known = set(ApiClient.objects.filter(name__in=options["client"]).values_list("name", flat=True))
        missing = sorted(set(options["client"]) - known)
        if missing:
            raise CommandError(f"No API client named {', '.join(missing)}; see the admin's API clients.")
        return DeadLetterCriteria(
            since=since,
            until=until,
            channels=tuple(options["channel"]),
            providers=tuple(options["provider"]),
            error_types=tuple(options["error_type"]),
            categories=tuple(options["category"]),
            priorities=tuple(options["priority"]),
            states=tuple(options["state"]),
            client_names=tuple(options["client"]),
            ids=ids,
            kinds=tuple(options["kind"]),
            endpoints=tuple(options["endpoint"]),
            parked=True,
        )

    def _describe(self, selection, matched: int, selected: int, show: int) -> None:
        if not matched:
            self.stdout.write("No parked dead letter matches. Nothing to replay.")
            return
        limited = f", the oldest {selected} selected (--limit)" if selected < matched else ""
        self.stdout.write(f"Matched {matched} parked dead letter{'s' if matched != 1 else ''}{limited}.")
        rows = list(selection.values("kind", "channel", "error_type", "provider"))
        for label, key in (
            ("kind", "kind"),
            ("channel", "channel"),
            ("error type", "error_type"),
            ("provider", "provider"),
        ):
            counts = Counter(row[key] or "none" for row in rows)
            self.stdout.write(f"  by {label}: " + ", ".join(f"{name} {n}" for name, n in counts.most_common()))
        if show <= 0:
            return
        listed = list(selection[:show])
        header = f"  {'ID':>8}  {'MESSAGE':36}  {'CHANNEL':8}  {'PROVIDER':8}  {'ERROR TYPE':17}  {'CATEGORY':14}"
        self.stdout.write(header + "  PARKED (UTC)")
        for dead_letter in listed:
            self.stdout.write(self._row(dead_letter))
        if selected > len(listed):
            self.stdout.write(f"  … and {selected - len(listed)} more (--show N lists more)")

    @staticmethod
    def _row(dead_letter: DeadLetter) -> str:
        return (
            f"  {dead_letter.pk:>8}  {dead_letter.message_id!s:36}  {dead_letter.channel:8}  "
            f"{dead_letter.provider or '-':8}  {dead_letter.error_type:17}  {(dead_letter.category or '-')[:14]:14}  "
            f"{dead_letter.created_at:%Y-%m-%d %H:%M:%S}"
        )

    def _confirm(self, selected: int, options) -> None:
        if selected <= CONFIRM_ABOVE or options["yes"]:
            return
        if not sys.stdin.isatty():
            raise CommandError(
                f"{selected} dead letters would be replayed; add --yes to confirm (or narrow with filters, --limit)."
            )
        answer = input(f"Replay {selected} dead letters now? [y/N] ").strip().lower()
        if answer not in ("y", "yes"):
            raise CommandError("Nothing replayed.")

    def _summarise(self, report, matched: int, options) -> None:
        skipped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(report.skipped.items()))
        if report.dry_run:
            self.stdout.write(
                f"Dry run: {report.replayed} would be replayed"
                + (f"; {skipped}" if skipped else "")
                + ". Nothing was changed."
            )
        elif report.selected:
            kinds = ", ".join(f"{n} {kind}s" for kind, n in sorted(report.replayed_by_kind.items()) if n)
            self.stdout.write(
                self.style.SUCCESS(
                    f"Replayed {report.replayed} of {report.selected}"
                    + (f" ({kinds})" if kinds else "")
                    + f" (replay {report.replay_id})."
                )
            )
            if skipped:
                self.stdout.write(f"Skipped: {skipped}.")
            if report.replayed_by_kind[DeadLetterKind.MESSAGE]:
                self.stdout.write(
                    "Their messages are accepted again and queued; follow them in the admin or with "
                    "GET /api/v1/messages/<id>/."
                )
            if report.replayed_by_kind[DeadLetterKind.CALLBACK]:
                self.stdout.write("The callbacks are pending again, with the same webhook-id; delivery was kicked.")
        if report.skipped.get(SkipReason.PAST_DEADLINE) or report.skipped.get(SkipReason.ARRIVED):
            self.stdout.write("Add --force to send the skipped ones anyway.")
        if report.skipped.get(SkipReason.SUPPRESSED):
            self.stdout.write(
                "Skipped as suppressed: the address is on the client's suppression list (--force does not "
                "override it). Lift it (`manage.py suppressions`, the admin, or the API), then replay."
            )
        if report.skipped.get(SkipReason.ENDPOINT_DISABLED):
            self.stdout.write("Enable the skipped callbacks' endpoints first (admin or API), then replay them.")
        if report.selected < matched:
            self.stdout.write(f"{matched - report.selected} more match; run again for them.")
