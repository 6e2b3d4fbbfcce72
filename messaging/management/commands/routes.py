"""manage.py routes: list the providers' routing conditions and changes, or drain, restore and weight one."""

from __future__ import annotations

import getpass

from django.core.management.base import BaseCommand, CommandError

from messaging.conf import messaging_setting
from messaging.management.commands.replay_dead_letters import HelpFormatter
from messaging.models import RouteCondition
from messaging.route_health import UNSET
from messaging.route_operations import (
    RouteInputError,
    route_change_by_operator,
    routes_listed,
    routing_changes_recent,
)


class Command(BaseCommand):
    help = """Show or change how providers take new traffic (docs/routing.md).

  manage.py routes [list] [--changes N]
  manage.py routes drain PROVIDER [--country CC] --reason WHY [--dry-run]
  manage.py routes restore PROVIDER [--country CC] --reason WHY [--dry-run]
  manage.py routes weight PROVIDER N|none [--country CC] --reason WHY [--dry-run]

A drained provider gets no new messages while another provider of its channel can take them (it
stays the channel's last resort: a message is not failed because its only provider is drained).
restore makes it healthy again (also undoing a degradation set by the receipt detector; the
detector degrades it again if its receipts still say so). weight N shares the first place of the
route between the providers of a channel that have a weight, in proportion (none: route order).
--country (ISO 3166-1 alpha-2, e.g. US) limits a change to recipients of that country; without it
the change is for every country, and a country's own row cannot undo a drain for every country.

Every change is recorded (admin: Routing changes; the dashboard) with the source
operator:<--operator, default your login name> and the reason. --dry-run says what would change."""

    def create_parser(self, prog_name, subcommand, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)  # the description kept as written
        return super().create_parser(prog_name, subcommand, **kwargs)

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="{list,drain,restore,weight}")
        listing = actions.add_parser("list", help="The routes, each provider's condition and the last changes.")
        listing.add_argument("--changes", type=int, default=10, metavar="N", help="Last N changes (default 10).")
        for name, text in (
            ("drain", "No new traffic to PROVIDER while another provider of its channel can take it."),
            ("restore", "PROVIDER healthy again: its place in the route (and its weight)."),
            ("weight", "PROVIDER's weight in the split of its channel's first place (none: route order)."),
        ):
            action = actions.add_parser(name, help=text, description=text)
            action.add_argument("provider", metavar="PROVIDER")
            if name == "weight":
                action.add_argument("weight", metavar="N", help="0 to 1000, or none.")
            action.add_argument("--country", default="", metavar="CC", help="Only recipients of this country.")
            action.add_argument("--reason", required=True, help="Why (kept with the change).")
            action.add_argument("--operator", default="", help="Who (default: your login name).")
            action.add_argument("--dry-run", action="store_true", help="Say what would change; change nothing.")

    def handle(self, *args, **options):
        action = options.get("action") or "list"
        if action == "list":
            self._list(options.get("changes", 10))
            return
        condition: str | None = None
        weight = UNSET
        if action == "drain":
            condition = RouteCondition.DRAINED
        elif action == "restore":
            condition = RouteCondition.HEALTHY
        else:
            weight = _weight(options["weight"])
        try:
            result = route_change_by_operator(
                provider=options["provider"],
                country=options["country"],
                condition=condition,
                weight=weight,
                reason=options["reason"],
                operator=options["operator"] or getpass.getuser(),
                dry_run=options["dry_run"],
            )
        except RouteInputError as exc:
            raise CommandError(f"{exc.field}: {exc.message}") from None
        self.stdout.write(("dry run: " if result.dry_run else "") + result.describe())

    def _list(self, changes: int) -> None:
        for channel, providers in messaging_setting("ROUTES").items():
            self.stdout.write(f"{channel}: {' -> '.join(providers)}")
        rows = list(routes_listed())
        self.stdout.write("")
        self.stdout.write("Provider routes:" if rows else "Provider routes: none set (every provider healthy).")
        for route in rows:
            self.stdout.write(
                f"  {route.provider:<10} {route.country or 'all':<4} {route.condition:<9} "
                f"weight {route.weight if route.weight is not None else 'none':<5} "
                f"{route.changed_at:%Y-%m-%d %H:%M} {route.source}: {route.reason}"
            )
        recent = list(routing_changes_recent(limit=max(changes, 0)))
        if recent:
            self.stdout.write("")
            self.stdout.write("Last changes:")
        for change in recent:
            self.stdout.write(
                f"  {change.created_at:%Y-%m-%d %H:%M:%S} {change.provider} {change.country or 'all'} "
                f"{change.from_condition} -> {change.to_condition}"
                f"{_weights(change.from_weight, change.to_weight)} by {change.source}: {change.reason}"
            )


def _weight(raw: str) -> int | None:
    if raw.lower() == "none":
        return None
    try:
        return int(raw)
    except ValueError:
        raise CommandError(f"weight: {raw!r} is not a whole number (or none).") from None


def _weights(before: int | None, after: int | None) -> str:
    return "" if before == after else f", weight {before} -> {after}"
