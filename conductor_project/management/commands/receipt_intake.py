"""`manage.py receipt_intake`: serve provider receipt webhooks from an event loop (messaging.intake)."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from conductor_project.checks import refuse_to_start_on_errors
from messaging.intake import run_intake
from providers.conf import receipts_base_url


class Command(BaseCommand):
    help = (
        "Serve the providers' receipt webhooks (/webhooks/twilio/, /webhooks/vonage/, "
        "/webhooks/mailgun/, /webhooks/anymail/...) from an asyncio server: each receipt is verified "
        "and stored (the web answers the same URLs, more slowly). Providers are told to post to "
        "CONDUCTOR_RECEIPTS_URL: set it to where this server is reachable (e.g. behind your proxy) "
        "for every process that sends. Several processes may share one port (SO_REUSEPORT). "
        "Stop it with Ctrl-C or SIGTERM."
    )
    requires_system_checks: list[str] = []  # run below, refusing to start on errors as the web does

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--port", type=int, default=8001, help="TCP port to listen on (default: 8001).")
        parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: 127.0.0.1).")
        parser.add_argument(
            "--processes",
            type=int,
            default=1,
            help="Server processes sharing the port (SO_REUSEPORT), one core each (default: 1). One "
            "takes about 3,000 receipts/s on a core of its own.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["processes"] < 1:
            raise CommandError("--processes must be at least 1")
        refuse_to_start_on_errors("the receipt intake")
        self.stderr.write(f"providers are told to post receipts to {receipts_base_url()}/webhooks/…")
        try:
            run_intake(options["host"], options["port"], processes=options["processes"])
        except OSError as exc:  # typically the port is already taken
            raise CommandError(f"Cannot listen on {options['host']}:{options['port']}: {exc}") from exc
