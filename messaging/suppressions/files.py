"""Suppression lists as CSV: the import behind the API's import/ and `manage.py suppressions import`,
and the export of the command. Each line is added whole or refused with its line number and field."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import phonenumbers
from django.core.validators import validate_email

from messaging.models import ApiClient, Suppression, SuppressionReason
from messaging.routing import Channel
from messaging.suppressions.selectors import suppression_address
from messaging.suppressions.services import SuppressionEntry, suppressions_add_many

IMPORT_MAX_LINES = 10_000  # a client's list in one request; more: split the file (or the command)
REQUIRED_COLUMNS = ("channel", "address")
OPTIONAL_COLUMNS = ("scope", "reason", "note")
EXPORT_COLUMNS = (
    *("id", "channel", "address", "scope", "reason", "covers_exempt", "source", "note", "created_at"),
    *("lifted_at", "lifted_reason", "lifted_by"),
)
# An export's other columns are read back without complaint (a round trip); a lifted row is skipped.
EXPORT_ONLY_COLUMNS = tuple(name for name in EXPORT_COLUMNS if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
SCOPE_MAX_LENGTH = Suppression._meta.get_field("scope").max_length
NOTE_MAX_LENGTH = 1000
PHONE_CHANNELS = frozenset({Channel.SMS, Channel.WHATSAPP})
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ImportRefused(ValueError):
    """The file as a whole cannot be imported (no header, unknown column, too many lines)."""


def address_normalized(channel: str, address: str) -> str:
    """The address as a message's `to` holds it (E.164 for phones, a valid email), then in the
    list's form (suppression_address); raises ValueError saying what is wrong."""
    address = address.strip()
    if channel in PHONE_CHANNELS:
        number = address.removeprefix("whatsapp:")
        if not number.startswith("+"):
            raise ValueError("Give the number in E.164 format, e.g. +14155552671.")
        try:
            parsed = phonenumbers.parse(number, None)
        except phonenumbers.NumberParseException as exc:
            raise ValueError(f"Not a phone number: {exc}.") from None
        if not phonenumbers.is_valid_number(parsed):
            raise ValueError("Not a valid phone number (checked against the numbering plan).")
        return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    try:
        validate_email(address)
    except Exception:  # django's ValidationError: its only failure
        raise ValueError("Not a valid email address.") from None
    return suppression_address(channel, address)


def scope_problem(scope: str) -> str | None:
    if len(scope) > SCOPE_MAX_LENGTH:
        return f"Ensure this field has no more than {SCOPE_MAX_LENGTH} characters."
    if _CONTROL.search(scope):
        return "Control characters and line breaks are not allowed here."
    return None


@dataclass
class ImportReport:
    lines: int = 0  # data lines read (the header not counted)
    added: int = 0
    already: int = 0  # an active suppression of the same channel, address and scope existed (or came earlier)
    lifted: int = 0  # lines of an export that were lifted there: not imported
    errors: list[dict] = field(default_factory=list)  # {line, field, error}; line 1 is the header

    def as_dict(self) -> dict:
        return {"added": self.added, "already": self.already, "errors": self.errors}


@dataclass(frozen=True)
class _Row:
    line: int
    channel: str
    address: str
    scope: str
    reason: str
    note: str


def _rows(text: str, *, allowed_reasons: frozenset[str], max_lines: int | None, report: ImportReport) -> list[_Row]:
    """The file's valid lines; the bad ones go to report.errors. Raises ImportRefused for the file."""
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))  # a BOM from a spreadsheet: not a column name
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        raise ImportRefused("The file is empty: give a header row (channel,address[,scope,reason,note]).") from None
    except csv.Error as exc:
        raise ImportRefused(f"Line 1 is not CSV: {exc}.") from None
    missing = [name for name in REQUIRED_COLUMNS if name not in header]
    if missing:
        raise ImportRefused(
            f"The first line must be a header naming the columns channel,address[,scope,reason,note]; "
            f"missing: {', '.join(missing)}."
        )
    unknown = [name for name in header if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS + EXPORT_ONLY_COLUMNS]
    if unknown or len(set(header)) != len(header):
        raise ImportRefused(
            f"Unknown or repeated column(s) in the header: {', '.join(unknown) or 'repeated'}; "
            f"the columns are channel, address, scope, reason, note."
        )
    rows = []
    try:
        for values in reader:
            line = reader.line_num
            if not any(value.strip() for value in values):
                continue  # a blank line (a trailing newline in a spreadsheet's export)
            report.lines += 1
            if max_lines is not None and report.lines > max_lines:
                raise ImportRefused(f"More than {max_lines} lines: split the file (or use manage.py suppressions).")
            row = _row(line, header, values, allowed_reasons, report)
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        raise ImportRefused(f"Line {reader.line_num} is not CSV: {exc}.") from None
    return rows


def _row(
    line: int, header: list[str], values: list[str], allowed_reasons: frozenset[str], report: ImportReport
) -> _Row | None:
    def refuse(name: str, error: str) -> None:
        report.errors.append({"line": line, "field": name, "error": error})

    if len(values) > len(header):
        refuse("line", f"{len(values)} values for {len(header)} columns (quote a value holding a comma).")
        return None
    given = dict(zip(header, [value.strip() for value in values], strict=False))
    if given.get("lifted_at"):
        report.lifted += 1
        return None
    channel = given.get("channel", "").lower()
    if channel not in Channel.values:
        refuse("channel", f"{given.get('channel', '')[:40]!r} is not a channel: one of {', '.join(Channel.values)}.")
        return None
    try:
        address = address_normalized(channel, given.get("address", ""))
    except ValueError as exc:
        refuse("address", str(exc))
        return None
    scope = given.get("scope", "")
    problem = scope_problem(scope)
    if problem:
        refuse("scope", problem)
        return None
    reason = given.get("reason", "") or SuppressionReason.MANUAL
    if reason not in allowed_reasons:
        refuse("reason", f"{reason[:40]!r} cannot be imported here: one of {', '.join(sorted(allowed_reasons))}.")
        return None
    note = given.get("note", "")
    if len(note) > NOTE_MAX_LENGTH:
        refuse("note", f"Ensure this field has no more than {NOTE_MAX_LENGTH} characters.")
        return None
    return _Row(line, channel, address, scope, reason, note)


def suppressions_import(
    *,
    client: ApiClient,
    text: str,
    source: str,
    allowed_reasons: Iterable[str] = (SuppressionReason.MANUAL,),
    dry_run: bool = False,
    max_lines: int | None = IMPORT_MAX_LINES,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Add the CSV's suppressions for `client` (header row required; columns channel, address and
    optionally scope, reason, note). A good line is added or counted as already there; a bad one
    is reported and skipped. `dry_run` counts without writing; more than `max_lines` lines are
    refused. `progress(done, total)` is called every 2,000 lines. Raises ImportRefused when the file
    as a whole is unusable."""
    report = ImportReport()
    rows = _rows(text, allowed_reasons=frozenset(allowed_reasons), max_lines=max_lines, report=report)
    chunk = 2000  # lines stored per transaction: progress to show, and bounded statements
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        new = suppressions_add_many(
            client=client,
            entries=[SuppressionEntry(r.channel, r.address, r.reason, r.scope, r.note) for r in part],
            source=source,
            dry_run=dry_run,
        )
        report.added += sum(new)
        report.already += len(new) - sum(new)
        if progress is not None and len(rows) > chunk:
            progress(start + len(part), len(rows))
    return report


def suppressions_export(*, client: ApiClient, active_only: bool = False) -> Iterator[list[str]]:
    """The client's suppressions as CSV rows (the header first), oldest first; lifted ones too
    unless `active_only`. Read in chunks: any size of list."""
    yield list(EXPORT_COLUMNS)
    rows = Suppression.objects.filter(client=client).order_by("created_at", "pk")
    if active_only:
        rows = rows.filter(lifted_at__isnull=True)
    for suppression in rows.iterator(chunk_size=2000):
        yield [_text(getattr(suppression, name)) for name in EXPORT_COLUMNS]


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)
