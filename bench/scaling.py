"""How the bulk campaign's cost grows with its size (issue 9's (e)).

Runs bench/bulk_throughput.py's whole measurement (fresh database and stack each step: ingest,
the no-op baseline, the drain with critical SMS alongside, RSS, the exactly-once check) at 1x,
2x and 4x --base messages (default 50,000: 50k, 100k, 200k) and prints per step: msg/s and its
ratio to that step's baseline, bulk worker RSS start/middle/end, bulk worker CPU ms per message,
the drain time and the whole step's time. Flat cost means msg/s and CPU ms/message about the same
at every step (the drain time growing linearly), and RSS not growing with the count.

Run: .venv/bin/python bench/scaling.py [--base 50000] [--steps 1,2,4] [--json PATH]
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import bulk_throughput
from _support import Figure, fresh_database, print_figures, stop_on_sigterm, write_json

FLAT = 0.20  # within 20 % of the 1x step counts as flat


def main() -> None:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=50_000, help="messages at 1x (default 50000)")
    parser.add_argument("--steps", default="1,2,4", help="multiples of --base, comma-separated (default 1,2,4)")
    bulk_throughput.add_arguments(parser, messages_default=None)
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]

    results = []
    for step in steps:
        opts = bulk_throughput.options_from(args, step * args.base)
        print(f"\n=== {step}x: {opts.messages:,} messages ===", flush=True)
        key = fresh_database(bulk_throughput.DATABASE)
        results.append((step, bulk_throughput.measure(key, opts, label=f"{step}x")))

    print(f"\nScaling, base {args.base:,} messages ({args.bulk_workers} bulk worker x -c {args.concurrency}):\n")
    print(
        "| step | messages | msg/s | vs no-op baseline | RSS start / middle / end MB | CPU ms/msg | drain s | step s |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|")
    for step, r in results:
        rss = r.rss_mb
        print(
            f"| {step}x | {r.options['messages']:,} | {r.throughput_dispatch:,.0f} "
            f"| {r.throughput_dispatch / bulk_throughput.baseline_rate(r):.2f}x "
            f"| {rss['start']:.0f} / {rss['middle']:.0f} / {rss['end']:.0f} | {r.cpu_ms_per_message:.2f} "
            f"| {r.drain_s:.0f} | {r.elapsed_s:.0f} |"
        )

    first_step, first = results[0]
    figs = []
    for step, r in results[1:]:
        rate_change = r.throughput_dispatch / first.throughput_dispatch - 1
        cpu_change = r.cpu_ms_per_message / first.cpu_ms_per_message - 1
        rss_change = r.rss_mb["end"] / first.rss_mb["end"] - 1
        # Only growth counts against it: a cheaper message at a larger count is start-up cost amortised.
        flat = rate_change >= -FLAT and cpu_change <= FLAT and rss_change <= FLAT
        figs.append(
            Figure(
                f"(e) scaling {step}x vs {first_step}x ({r.options['messages']:,} vs {first.options['messages']:,})",
                "msg/s, CPU ms/msg, end RSS",
                f"{r.throughput_dispatch:,.0f} msg/s, {r.cpu_ms_per_message:.2f} ms, {r.rss_mb['end']:.0f} MB",
                f"{first.throughput_dispatch:,.0f} msg/s, {first.cpu_ms_per_message:.2f} ms, "
                f"{first.rss_mb['end']:.0f} MB at {first_step}x",
                f"{rate_change:+.0%} / {cpu_change:+.0%} / {rss_change:+.0%} (flat: within {FLAT:.0%})",
                "flat" if flat else "grows",
            )
        )
    for step, r in results:
        figs.extend(bulk_throughput.figures(r, benchmark=f"(e) {step}x, {r.options['messages']:,} msgs")[:1])
    print_figures(figs)
    write_json(args.json, figs, {"base": args.base, "steps": {str(s): asdict(r) for s, r in results}})


if __name__ == "__main__":
    main()
