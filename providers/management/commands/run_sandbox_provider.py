"""`manage.py run_sandbox_provider`: run the sandbox provider (the providers' emulator) in the foreground."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from providers.sandbox.app import run_sandbox
from providers.sandbox.settings import sandbox_config_from_settings


class Command(BaseCommand):
    help = (
        "Start the sandbox provider: an HTTP server that speaks Twilio's Messages API (and the "
        "other providers' wire formats), sends signed receipt callbacks after a delay, and takes "
        "fault settings at runtime under /_sandbox/ (requests, faults, reset, callbacks, healthz). "
        "It checks and signs with the providers' credentials in settings.CONDUCTOR_PROVIDERS. "
        "Stop it with Ctrl-C or SIGTERM."
    )
    # It never touches the database, so it must start even before migrations have run.
    requires_system_checks: list[str] = []
    requires_migrations_checks = False

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--port", type=int, default=8025, help="TCP port to listen on (default: 8025).")
        parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default: 127.0.0.1).")
        parser.add_argument(
            "--seed",
            type=int,
            default=None,
            help="Seed the fault dice so a run is reproducible (default: unseeded). "
            'POST /_sandbox/reset {"seed": N} reseeds at runtime.',
        )
        parser.add_argument(
            "--in-process-callbacks",
            action="store_true",
            help="Post receipt callbacks from the sandbox's own process instead of a child process "
            "(slower answers under callback load; for debugging).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            config = sandbox_config_from_settings(
                seed=options["seed"], callback_process=not options["in_process_callbacks"]
            )
        except (ImproperlyConfigured, KeyError) as exc:
            raise CommandError(f"Cannot configure the sandbox provider: {exc}") from exc
        try:
            run_sandbox(options["host"], options["port"], config)
        except OSError as exc:  # typically the port is already taken
            raise CommandError(f"Cannot listen on {options['host']}:{options['port']}: {exc}") from exc
