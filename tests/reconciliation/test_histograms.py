"""Latency histograms: the bucket a value falls in and quantiles read back (pure functions)."""

from __future__ import annotations

import random

import pytest

from reconciliation import histograms
from reconciliation.histograms import BOUNDS


def test_a_value_on_a_bound_counts_in_that_bound_like_prometheus_le():
    assert histograms.slot(0.0) == 0
    assert histograms.slot(0.05) == 0
    assert histograms.slot(0.0500001) == 1
    assert histograms.slot(BOUNDS[-1]) == len(BOUNDS) - 1
    assert histograms.slot(BOUNDS[-1] + 1) == len(BOUNDS)  # the open-ended top bucket


def test_an_empty_histogram_has_no_quantile():
    assert histograms.quantile(histograms.empty(), 0.5) is None


def test_quantiles_interpolate_within_the_bucket():
    counts = histograms.empty()
    counts[histograms.slot(0.3)] = 100  # all in (0.25, 0.5]
    assert histograms.quantile(counts, 0.5) == pytest.approx(0.375)
    assert histograms.quantile(counts, 0.99) == pytest.approx(0.25 + 0.25 * 0.99)


def test_quantiles_of_a_sample_stay_within_the_bucket_holding_the_true_value():
    rng = random.Random(5)
    values = [rng.lognormvariate(-1.5, 1.2) for _ in range(20_000)]
    counts = histograms.empty()
    for value in values:
        histograms.observe(counts, value)
    values.sort()
    for q in (0.5, 0.95, 0.99):
        true = values[int(q * len(values)) - 1]
        estimate = histograms.quantile(counts, q)
        i = histograms.slot(true)
        lower = BOUNDS[i - 1] if i else 0.0
        assert lower <= estimate <= BOUNDS[i], (q, true, estimate)


def test_the_top_bucket_reports_the_highest_bound():
    counts = histograms.empty()
    counts[-1] = 3
    assert histograms.quantile(counts, 0.99) == BOUNDS[-1]


def test_merged_sums_and_tolerates_missing_histograms():
    a, b = histograms.empty(), histograms.empty()
    a[0], b[0], b[3] = 2, 3, 1
    assert histograms.merged([a, b, []])[:4] == [5, 0, 0, 1]
