"""What the send path's suppression check (issue 22) costs a bulk drain.

Every claim reads the suppression lists of all its messages' hops in one query
(messaging.suppressions.selectors.SuppressionIndex) and skips suppressed hops before any call
(messaging.dispatch._skip_suppressed). This drains a bulk SMS campaign through the real send path,
in this process (messages_dispatch with fair claims of BULK_BATCH_SIZE, as a bulk worker's task
runs it, one claim after another), against the sandbox over HTTP, in its own database
(conductor_bench_suppressions, dropped and created again), with a suppression list of
--suppressions numbers for the campaign's client (none of them in the campaign: acceptance turns
those away; by default 1 % of the campaign's numbers suppressed for another category, so the
index matches rows and the exempt-categories query and the per-hop rule run too: the dear case;
--matched-every 0 for none).

Figures:
 - headline: the check's time inside the claims (the index's load, its queries included, and the
   skip pass) against the claims' total time, over a whole drain with everything on;
 - info: the drain's msg/s with the check on and with it patched out in this process (the index
   loaded as empty, no query), --repeats runs each, interleaved; medians.

Target (issue 22): the check adds < 3 % to the bulk drain.

Run: .venv/bin/python bench/suppression_check.py [--messages 20000] [--suppressions 20000]
     [--latency-ms 50] [--repeats 3] [--matched-every 100]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from datetime import timedelta
from typing import Any

from _support import Figure, fresh_database, print_figures

DATABASE = "conductor_bench_suppressions"


class Timer:
    """Seconds spent in the wrapped functions, and in the claims."""

    def __init__(self) -> None:
        self.check_s = 0.0
        self.claims_s = 0.0
        self.claims = 0

    def wrap(self, function: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.check_s += time.perf_counter() - started

        return timed


def campaign(count: int, run: int) -> list[str]:
    return [f"+1415{run:01d}{i:06d}" for i in range(count)]


def populate(client: Any, numbers: list[str]) -> None:
    from django.utils import timezone

    from messaging.models import Message

    now = timezone.now()
    rows = [
        Message(
            client=client,
            channel="sms",
            to=number,
            body="Spring sale: 20 % off",
            priority="bulk",
            category="news",
            expires_at=now + timedelta(hours=1),
            created_at=now,
            accepted_at=now,
            enqueued_at=now,
        )
        for number in numbers
    ]
    Message.objects.bulk_create(rows, batch_size=5000)


def suppress(client: Any, count: int, campaign_numbers: list[str], matched_every: int) -> None:
    from django.utils import timezone

    from messaging.models import Suppression

    now = timezone.now()
    rows = [
        Suppression(client=client, channel="sms", address=f"+1202{i:07d}", reason="stop_keyword", created_at=now)
        for i in range(count)
    ]
    # Matched by the index, not blocking: the campaign's category is "news".
    rows += [
        Suppression(
            client=client, channel="sms", address=number, scope="marketing", reason="unsubscribed", created_at=now
        )
        for number in (campaign_numbers[::matched_every] if matched_every else [])
    ]
    Suppression.objects.bulk_create(rows, batch_size=5000)


def drain(timer: Timer) -> tuple[int, float]:
    """Claim fair batches until none is left; (messages, seconds)."""
    from messaging.dispatch import messages_dispatch

    total, started = 0, time.perf_counter()
    while True:
        claim_started = time.perf_counter()
        claimed = messages_dispatch(fair_channel="sms")
        if not claimed:
            return total, time.perf_counter() - started
        timer.claims_s += time.perf_counter() - claim_started
        timer.claims += 1
        total += claimed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--suppressions", type=int, default=20000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    # One campaign number in this many has a (non-blocking) suppression: the index matches rows.
    # 0: none matched, the common case (acceptance turns suppressed recipients away).
    parser.add_argument("--matched-every", type=int, default=100)
    args = parser.parse_args()

    fresh_database(DATABASE)
    # No per-attempt log lines: a smaller denominator, so a larger (dearer) share for the check.
    logging.disable(logging.INFO)
    import requests
    from django.conf import settings
    from django.db import connection

    import messaging.dispatch as dispatch
    from messaging.models import ApiClient
    from messaging.suppressions.selectors import SuppressionIndex
    from providers.registry import reset_provider_cache
    from providers.sandbox.app import start_background
    from providers.sandbox.settings import sandbox_config_from_settings

    sandbox = start_background(sandbox_config_from_settings(seed=1))
    try:
        for name in ("twilio", "vonage", "mailgun"):
            settings.CONDUCTOR_PROVIDERS[name]["BASE_URL"] = sandbox.url
        reset_provider_cache()
        client = ApiClient.objects.get(name="bench")
        suppress(client, args.suppressions, campaign(args.messages, 0), args.matched_every)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE messaging_suppression")

        class Off(SuppressionIndex):
            @classmethod
            def load(cls, triples: Any) -> SuppressionIndex:
                for _ in triples:  # the generator is consumed, as the real load does
                    pass
                return cls({}, {})

        real_load, real_skip = SuppressionIndex.load, dispatch._skip_suppressed
        rates: dict[str, list[float]] = {"on": [], "off": []}
        shares: list[tuple[float, float, int]] = []
        for run in range(args.repeats * 2):
            variant = "on" if run % 2 == 0 else "off"
            with connection.cursor() as cursor:
                cursor.execute("TRUNCATE messaging_message CASCADE")
            requests.post(f"{sandbox.url}/_sandbox/reset", json={}, timeout=10).raise_for_status()
            requests.post(
                f"{sandbox.url}/_sandbox/faults",
                json={
                    "provider": "twilio",
                    "latency_ms": args.latency_ms,
                    "callback_mode": "final_only",
                    "receipt_loss_rate": 1.0,
                },
                timeout=10,
            ).raise_for_status()
            populate(client, campaign(args.messages, 0))
            with connection.cursor() as cursor:
                cursor.execute("ANALYZE messaging_message")
            timer = Timer()
            if variant == "on":
                timed_load = timer.wrap(real_load)
                dispatch.SuppressionIndex = type(
                    "Timed", (SuppressionIndex,), {"load": classmethod(lambda cls, t, load=timed_load: load(t))}
                )
                dispatch._skip_suppressed = timer.wrap(real_skip)
            else:
                dispatch.SuppressionIndex = Off
                dispatch._skip_suppressed = real_skip
            try:
                sent, seconds = drain(timer)
            finally:
                dispatch.SuppressionIndex, dispatch._skip_suppressed = SuppressionIndex, real_skip
            assert sent == args.messages, (sent, args.messages)
            rates[variant].append(sent / seconds)
            line = f"run {run + 1} ({variant}): {sent} messages in {seconds:.1f} s, {sent / seconds:.0f} msg/s"
            if variant == "on":
                shares.append((timer.check_s, timer.claims_s, timer.claims))
                per_claim_ms = timer.claims_s * 1000 / timer.claims
                line += f"; check {timer.check_s * 1000 / timer.claims:.2f} ms of {per_claim_ms:.1f} ms per claim"
            print(line, flush=True)
    finally:
        sandbox.stop()

    check_s = sum(s[0] for s in shares)
    claims_s = sum(s[1] for s in shares)
    claims = sum(s[2] for s in shares)
    share = 100 * check_s / claims_s
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    name = "suppression check (issue 22)"
    matched = f"1 in {args.matched_every} matched" if args.matched_every else "none matched"
    setup = f"{args.messages} bulk SMS, {args.suppressions} suppressions ({matched}), sandbox {args.latency_ms:g} ms"
    print_figures(
        [
            Figure(
                name,
                f"check's share of the claims' time ({setup}; {claims} claims)",
                f"{share:.2f} % ({check_s * 1000 / claims:.2f} ms of {claims_s * 1000 / claims:.1f} ms per claim)",
                "-",
                "< 3 %",
                "PASS" if share < 3 else "FAIL",
            ),
            Figure(
                name,
                f"drain msg/s, check on vs patched out (median of {args.repeats} each, interleaved)",
                f"{on:.0f} vs {off:.0f} ({100 * (on - off) / off:+.1f} % with the check)",
            ),
        ]
    )


if __name__ == "__main__":
    main()
