"""manage.py suppressions: import a client's suppression list from CSV, or export it as CSV."""

from __future__ import annotations

import csv
import getpass
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from messaging.management.commands.replay_dead_letters import HelpFormatter
from messaging.models import ApiClient, SuppressionReason
from messaging.suppressions.files import ImportRefused, suppressions_export, suppressions_import


class Command(BaseCommand):
    help = """Import or export a client's suppression list (addresses its messages must not go to).

  manage.py suppressions import --client acme list.csv [--dry-run]
  manage.py suppressions export --client acme [--output list.csv] [--active-only]

Import: a UTF-8 CSV whose first line is a header naming the columns channel,address and optionally
scope, reason, note (an export's other columns are read back and ignored; its lifted rows are
skipped). channel is sms, whatsapp or email; address an E.164 number (+14155552671) or an email
address; scope a category ("" or absent: every category but the client's opt-out-exempt ones);
reason one of manual (the default), unsubscribed, complaint, stop_keyword, provider_reported,
hard_bounce (hard_bounce also stops the exempt categories). A line already suppressed (same
channel, address and scope) is counted, not doubled; a bad line is reported by number and column
and skipped, the others are added. No size limit here (the API's import takes 10,000 lines).

Export: every suppression of the client (lifted ones too, with when and why, unless
--active-only), oldest first, to --output or standard output."""

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)  # the description kept as written
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", required=True, metavar="{import,export}")
        importing = actions.add_parser("import", help="Add suppressions from a CSV file.")
        importing.add_argument("--client", required=True, metavar="NAME", help="The API client's name.")
        importing.add_argument("file", metavar="FILE.csv", help="The CSV file (- for standard input).")
        importing.add_argument("--dry-run", action="store_true", help="Check the file and count; store nothing.")
        exporting = actions.add_parser("export", help="Write the client's suppressions as CSV.")
        exporting.add_argument("--client", required=True, metavar="NAME", help="The API client's name.")
        exporting.add_argument("--output", metavar="FILE", help="Write here instead of standard output.")
        exporting.add_argument("--active-only", action="store_true", help="Leave out lifted suppressions.")

    def handle(self, *args, **options):
        try:
            client = ApiClient.objects.get(name=options["client"])
        except ApiClient.DoesNotExist:
            names = ", ".join(ApiClient.objects.order_by("name").values_list("name", flat=True)[:20]) or "none"
            raise CommandError(f"No API client named {options['client']!r}. Clients: {names}.") from None
        if options["action"] == "import":
            self._import(client, options)
        else:
            self._export(client, options)

    def _import(self, client: ApiClient, options) -> None:
        text = self._read(options["file"])

        def progress(done: int, total: int) -> None:
            self.stderr.write(f"  {done} of {total} lines done...")

        try:
            report = suppressions_import(
                client=client,
                text=text,
                source=f"command import by {getpass.getuser()}"[:200],
                allowed_reasons=SuppressionReason.values,
                dry_run=options["dry_run"],
                max_lines=None,
                progress=progress,
            )
        except ImportRefused as exc:
            raise CommandError(f"{exc} Nothing was imported.") from None
        for error in report.errors[:50]:
            self.stdout.write(f"line {error['line']}, {error['field']}: {error['error']}")
        if len(report.errors) > 50:
            self.stdout.write(f"... and {len(report.errors) - 50} more bad lines.")
        verb = "Would add" if options["dry_run"] else "Added"
        summary = (
            f"{verb} {report.added} suppression(s) for {client.name}; {report.already} already suppressed; "
            f"{len(report.errors)} bad line(s) skipped"
            + (f"; {report.lifted} lifted row(s) of an export skipped" if report.lifted else "")
            + "."
        )
        self.stdout.write(self.style.SUCCESS(summary) if not report.errors else self.style.WARNING(summary))
        if report.errors:
            self.stdout.write(
                "Fix the bad lines and import the file again: the lines already added are counted, not doubled."
            )
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing was stored. Run again without --dry-run to import.")

    def _read(self, name: str) -> str:
        try:
            raw = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
        except OSError as exc:
            raise CommandError(f"Cannot read {name}: {exc.strerror}.") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(
                f"{name} is not UTF-8 ({exc.reason} at byte {exc.start}): save it as 'CSV UTF-8' and try again."
            ) from None

    def _export(self, client: ApiClient, options) -> None:
        output = options["output"]
        try:
            handle = open(output, "w", newline="", encoding="utf-8") if output else None  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"Cannot write {output}: {exc.strerror}.") from None
        writer = csv.writer(handle if handle is not None else self.stdout)
        count = -1  # the header is not a suppression
        try:
            for row in suppressions_export(client=client, active_only=options["active_only"]):
                writer.writerow(row)
                count += 1
                if count and count % 10_000 == 0:
                    self.stderr.write(f"  {count} written...")
        finally:
            if handle is not None:
                handle.close()
        if output:
            self.stdout.write(self.style.SUCCESS(f"Wrote {count} suppression(s) of {client.name} to {output}."))
