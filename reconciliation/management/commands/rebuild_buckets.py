"""manage.py rebuild_buckets: recount delivery buckets (and their hour roll-ups) over a span."""

from __future__ import annotations

import sys

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from messaging.management.commands.replay_dead_letters import parse_when
from reconciliation.buckets import buckets_rebuild
from reconciliation.conf import detector_settings


class Command(BaseCommand):
    help = (
        "Recount the delivery buckets that anomaly detection and the dashboard read, from the message "
        "and attempt rows, an hour at a time. Beat keeps recent buckets current by itself; run this to "
        "fill history it never counted (after an upgrade that adds a bucket field, or after beat was "
        "down for longer than the detection lookback). Safe to run again: it recounts, never adds."
    )

    def add_arguments(self, parser):
        parser.add_argument("--since", required=True, metavar="WHEN", help="From: 7d, 12h, or an ISO time.")
        parser.add_argument("--until", metavar="WHEN", help="To (default: now): 1h, or an ISO time.")

    def handle(self, *args, since: str, until: str | None, **options):
        now = timezone.now()
        try:
            start = parse_when(since, now=now)
            end = parse_when(until, now=now) if until else now
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if start >= end:
            raise CommandError("--since must be before --until.")
        hours = max(1, int((end - start).total_seconds() // 3600) + 1)
        with tqdm(total=hours, desc="recounting", unit="h", file=sys.stderr, disable=None) as bar:
            with logging_redirect_tqdm():
                written = buckets_rebuild(
                    since=start, until=end, settings=detector_settings(), progress=lambda _: bar.update(1)
                )
        self.stdout.write(
            self.style.SUCCESS(f"Recounted {written} buckets from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC.")
        )
