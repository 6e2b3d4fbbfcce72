"""How fast the anomaly detector sees a silent drop, and how often it cries wolf.

Seeded simulations (tests/support/delivery_simulation.py), the detector at its default settings,
evaluated at every minute's tick as beat would:
  - 10 messages/s, receipts after 5-60 s, 2 % never receipted: 10 % of messages silently dropped
    from a moment t0 on; time from t0 to the first receipt-rate alert, over 100 seeds;
  - the same traffic, no drop, 24 simulated hours, same 100 seeds: alerts of any kind;
  - 0.1 messages/s for 24 hours, same seeds: alerts of any kind;
  - for scale, how long a quiet channel (0.1 and 1 message/s) takes to show a 10 % and a 50 % drop.

Run: .venv/bin/python bench/anomaly_detection.py [--seeds 100]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "conductor_project.settings.test")

import django  # noqa: E402

django.setup()

from reconciliation.anomalies import DetectorSettings  # noqa: E402
from tests.support.delivery_simulation import Traffic, false_alarms, when_detected  # noqa: E402

DROP_AT = 10 * 3600.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def detection(seeds: range, settings: DetectorSettings, traffic: Traffic, horizon_s: float) -> list[float | None]:
    return [
        when_detected(s, settings, drop_at_s=DROP_AT + s * 7.3, traffic=traffic, horizon_s=horizon_s) for s in seeds
    ]


def describe(times: list[float | None], limit_s: float) -> str:
    found = [t for t in times if t is not None]
    within = sum(1 for t in found if t <= limit_s)
    if not found:
        return f"never detected in {len(times)} runs"
    return (
        f"detected in {len(found)}/{len(times)} runs, {within} within {limit_s / 60:.0f} min; "
        f"median {statistics.median(found) / 60:.1f} min, p95 {percentile(found, 0.95) / 60:.1f} min, "
        f"max {max(found) / 60:.1f} min"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100)
    seeds = range(parser.parse_args().seeds)
    settings = DetectorSettings()
    print(f"detector: {settings}")
    began = time.monotonic()
    times = detection(seeds, settings, Traffic(), horizon_s=3600)
    print(f"10 msg/s, silent 10 % drop: {describe(times, 900)}")
    for rate in (10.0, 0.1):
        alarms = [len(false_alarms(seed, settings, traffic=Traffic(rate))) for seed in seeds]
        print(f"{rate:>4} msg/s, 24 h steady: {sum(alarms)} alerts over {len(seeds)} runs")
    for rate in (1.0, 0.1):
        for drop in (0.10, 0.50):
            times = detection(seeds, settings, Traffic(rate, drop_fraction=drop), horizon_s=4 * 3600)
            print(f"{rate:>4} msg/s, silent {drop:.0%} drop: {describe(times, 3600)}")
    print(f"({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
