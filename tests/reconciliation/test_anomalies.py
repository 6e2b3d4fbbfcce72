"""The anomaly detector, a pure function: hand-made series, the statistics, and seeded simulations."""

from __future__ import annotations

import math
import statistics
from datetime import UTC, datetime, timedelta

import pytest

from reconciliation.anomalies import (
    AlertKind,
    Bucket,
    BucketSeries,
    DetectorSettings,
    attempt_end,
    cohort_end,
    detect,
    excess_z,
    floor_time,
    recovered,
)
from tests.support.delivery_simulation import Traffic, across_seeds, false_alarms, when_detected

NOW = datetime(2026, 11, 30, 12, 0, 30, tzinfo=UTC)
SETTINGS = DetectorSettings()


def steady(minutes: int, *, per_minute=600, receipt=0.98, delivered=0.95, end=None, errors=None, latency=120.0):
    """Complete cohorts, one a minute, ending at the last complete cohort before NOW."""
    end = end or cohort_end(NOW, SETTINGS)
    buckets = []
    for i in range(minutes, 0, -1):
        start = end - timedelta(minutes=i)
        buckets.append(
            Bucket(
                start=start,
                dispatched=per_minute,
                receipted=round(per_minute * receipt),
                delivered=round(per_minute * delivered),
                attempts=per_minute,
                errors=errors or {"provider_5xx": per_minute // 100},
                latency_count=per_minute,
                latency_sum_ms=per_minute * latency,
                latency_sumsq_ms=per_minute * (latency**2 + 30**2),
            )
        )
    return buckets


def replace_last(buckets, minutes: int, **changes):
    from dataclasses import replace

    return buckets[:-minutes] + [replace(b, **changes) for b in buckets[-minutes:]]


def kinds(findings):
    return sorted((f.kind, f.error_type) for f in findings)


# --- the statistics ---------------------------------------------------------------------------------
def brute_force_fisher(a, n1, c, n2) -> float:
    """P(X >= a) for X ~ Hypergeometric(total n1+n2, bad a+c, draws n1), exactly."""
    bad, total = a + c, n1 + n2
    denominator = math.comb(total, n1)
    return sum(math.comb(bad, k) * math.comb(total - bad, n1 - k) for k in range(a, min(bad, n1) + 1)) / denominator


@pytest.mark.parametrize("a, n1, c, n2", [(11, 115, 14, 957), (5, 40, 10, 400), (30, 300, 40, 3000), (3, 10, 2, 50)])
def test_the_z_score_is_fishers_exact_tail(a, n1, c, n2):
    p = brute_force_fisher(a, n1, c, n2)
    from statistics import NormalDist

    assert excess_z(a, n1, c, n2) == pytest.approx(-NormalDist().inv_cdf(p), rel=1e-6)


def test_no_excess_is_no_evidence_and_huge_excess_stays_finite():
    assert excess_z(2, 100, 20, 1000) == 0.0  # the same share
    assert excess_z(0, 100, 50, 1000) == 0.0
    assert 30 < excess_z(5000, 10000, 100, 100000) < math.inf


def test_the_normal_approximation_would_have_cried_wolf_on_a_quiet_channel():
    # 11 misses of 115 where the baseline misses 1.5 %: the pooled normal z says 5.4, Fisher far less.
    assert excess_z(11, 115, 14, 957) < 4.5


# --- detection on hand-made series --------------------------------------------------------------------
def test_steady_traffic_finds_nothing():
    assert detect(BucketSeries(steady(200)), now=NOW, settings=SETTINGS) == []


def test_a_receipt_drop_is_found_on_the_shortest_window_with_its_figures():
    series = BucketSeries(replace_last(steady(200), 2, receipted=round(600 * 0.85)))
    [finding] = [f for f in detect(series, now=NOW, settings=SETTINGS) if f.kind == AlertKind.RECEIPT_RATE_DROP]
    assert (finding.window_start, finding.window_end) == (
        cohort_end(NOW, SETTINGS) - timedelta(minutes=2),
        cohort_end(NOW, SETTINGS),
    )
    assert finding.observed == pytest.approx(0.85, abs=0.001) and finding.baseline == pytest.approx(0.98, abs=0.001)
    assert finding.recent_samples == 1200 and finding.baseline_samples == 72000
    assert finding.severity == "critical" and finding.score > 5  # 13 points: over twice the minimum change


def test_a_delivery_drop_with_receipts_still_coming_is_a_delivery_drop_only():
    series = BucketSeries(replace_last(steady(200), 3, delivered=round(600 * 0.85)))
    assert kinds(detect(series, now=NOW, settings=SETTINGS)) == [(AlertKind.DELIVERY_RATE_DROP, "")]


def test_a_small_wobble_on_a_busy_channel_is_not_an_alarm():
    # 3 points down on 1,200 messages is "significant" but below the minimum change worth an alert.
    series = BucketSeries(replace_last(steady(200), 2, receipted=round(600 * 0.95)))
    assert detect(series, now=NOW, settings=SETTINGS) == []


def test_recent_cohorts_that_have_not_had_time_for_receipts_are_not_judged():
    # The two newest cohorts have almost no receipts yet, as it is right after sending.
    end = floor_time(NOW, 60)
    young = [Bucket(start=end - timedelta(minutes=m), dispatched=600, receipted=30, attempts=600) for m in (1, 2)]
    series = BucketSeries(steady(200) + young)
    assert detect(series, now=NOW, settings=SETTINGS) == []


def test_too_few_messages_are_never_judged():
    series = BucketSeries(replace_last(steady(200, per_minute=1), 60, receipted=0, delivered=0))
    assert detect(series, now=NOW, settings=SETTINGS) == []


def test_an_error_type_that_rises_is_found_with_its_type():
    busy = replace_last(steady(200, end=attempt_end(NOW, SETTINGS)), 2, errors={"provider_5xx": 6, "rate_limited": 90})
    assert kinds(detect(BucketSeries(busy), now=NOW, settings=SETTINGS)) == [
        (AlertKind.ERROR_RATE_RISE, "rate_limited")
    ]


def test_latency_that_triples_is_found():
    slow = replace_last(
        steady(200, end=attempt_end(NOW, SETTINGS)), 2, latency_sum_ms=600 * 400.0, latency_sumsq_ms=600 * 400.0**2
    )
    [finding] = detect(BucketSeries(slow), now=NOW, settings=SETTINGS)
    assert finding.kind == AlertKind.LATENCY_RISE and finding.observed == pytest.approx(400.0)


def test_a_channel_without_receipts_is_judged_on_errors_and_latency_only():
    series = BucketSeries(replace_last(steady(200), 2, receipted=0, delivered=0))
    assert detect(series, now=NOW, settings=SETTINGS, expects_receipts=False) == []


def test_recovery_is_judged_against_the_baseline_the_alert_was_raised_against():
    still_low = BucketSeries(replace_last(steady(200), 5, receipted=round(600 * 0.88)))
    back = BucketSeries(steady(200))
    args = {"now": NOW, "settings": SETTINGS, "kind": AlertKind.RECEIPT_RATE_DROP, "error_type": ""}
    assert recovered(still_low, baseline=0.98, **args) is False
    assert recovered(back, baseline=0.98, **args) is True
    # Long after, the baseline itself is low: against the stored 98 % it has still not recovered.
    assert recovered(BucketSeries(steady(200, receipt=0.88)), baseline=0.98, **args) is False
    assert recovered(BucketSeries([]), baseline=0.98, **args) is None  # no traffic: cannot tell


# --- seeded simulations (the figures; bench/anomaly_detection.py prints them) -------------
SEEDS = range(100)
DROP_AT = 10 * 3600.0  # ten hours into the simulated day


def test_a_silent_10_percent_drop_at_10_per_second_is_alerted_within_15_minutes_in_95_of_100_runs():
    times = [
        when_detected(seed, SETTINGS, drop_at_s=DROP_AT + seed * 7.3, traffic=Traffic(), horizon_s=1800)
        for seed in SEEDS
    ]
    within = [t for t in times if t is not None and t <= 900]
    assert len(within) >= 95, sorted(t for t in times if t is not None)[-10:]
    print(f"detection after {statistics.median(within):.0f} s median, {sorted(within)[94]:.0f} s p95")


@pytest.mark.parametrize("rate", [10.0, 0.1])
def test_24_hours_of_steady_traffic_raise_no_alert(rate):
    days = across_seeds(false_alarms, SEEDS, settings=SETTINGS, traffic=Traffic(rate))
    found = [finding for day in days for finding in day]
    assert found == []
