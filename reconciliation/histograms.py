"""Latency histograms kept in delivery buckets: counts per fixed latency bound, summable, and
quantiles read back from them the way Prometheus's histogram_quantile does.

The bounds are the Prometheus histograms' own (messaging.metrics), so the dashboard and Grafana
agree. A histogram is a list of len(bounds) + 1 counts; the last counts values above every bound.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from messaging.metrics import LATENCY_BUCKETS_SECONDS

BOUNDS: tuple[float, ...] = LATENCY_BUCKETS_SECONDS
SIZE = len(BOUNDS) + 1


def empty() -> list[int]:
    return [0] * SIZE


def slot(seconds: float) -> int:
    """The bucket a latency falls in: the first bound it does not exceed (le, as Prometheus)."""
    return bisect_left(BOUNDS, seconds)


def observe(counts: list[int], seconds: float) -> None:
    counts[slot(max(0.0, seconds))] += 1


def merged(histograms: Iterable[Sequence[int]]) -> list[int]:
    """The sum of several histograms (missing or short ones count as empty)."""
    total = empty()
    for counts in histograms:
        for index, value in enumerate(counts[:SIZE]):
            total[index] += value
    return total


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation within its bucket; None if empty.

    Like histogram_quantile: a quantile in the open-ended top bucket is reported as the highest
    bound (it is at least that).
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[index - 1] if index else 0.0
            upper = BOUNDS[index]
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return BOUNDS[-1]
