"""Seeded synthetic delivery traffic for the anomaly detector: Poisson sends, receipts after a
random delay, natural non-receipts and errors, and an optional silent drop from a moment on.

Each message is drawn (numpy, vectorised per bucket); the detector sees the counts as they
stand at each minute's tick, recent cohorts only partly receipted, and may not look ahead.
Shared by tests/reconciliation/test_anomalies.py and bench/anomaly_detection.py.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial

import numpy as np

from reconciliation.anomalies import DetectorSettings, Totals, detect

EPOCH = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Traffic:
    rate_per_second: float = 10.0
    receipt_delay_s: tuple[float, float] = (5.0, 60.0)  # uniform
    receipt_probability: float = 0.98  # some messages never get a receipt, drop or not
    delivered_given_receipt: float = 0.97
    error_rates: tuple[tuple[str, float], ...] = (("provider_5xx", 0.01), ("rate_limited", 0.002))
    latency_median_ms: float = 120.0
    latency_sigma: float = 0.5  # log-normal
    diurnal_swing: float = 0.3  # traffic follows the day, +-30 %
    drop_from_s: float | None = None  # seconds after the start of the day; None: no drop
    drop_fraction: float = 0.10
    drop_until_s: float | None = None  # the drop stops here; None: it goes on
    # (from_s, factor): the rate times factor for buckets starting from then on (the last that
    # applies), e.g. a degraded route keeping only a probe share of its traffic.
    rate_changes: tuple[tuple[float, float], ...] = ()

    def factor(self, begin_s: float) -> float:
        applying = [factor for from_s, factor in self.rate_changes if begin_s >= from_s]
        return applying[-1] if applying else 1.0


class SimulatedSeries:
    """A Series of one channel and provider over a simulated span, with a look-ahead guard."""

    def __init__(self, traffic: Traffic, *, seed: int, start_s: float, end_s: float, bucket_s: int, maturity_s: int):
        rng = np.random.default_rng(seed)
        self.bucket_s, self.maturity_s = bucket_s, maturity_s
        self.first = math.floor(start_s / bucket_s)
        count = math.ceil(end_s / bucket_s) - self.first
        scalars = {name: np.zeros(count) for name in ("dispatched", "receipted", "delivered", "attempts")}
        scalars |= {name: np.zeros(count) for name in ("latency_count", "latency_sum_ms", "latency_sumsq_ms")}
        errors = {name: np.zeros(count) for name, _ in traffic.error_rates}
        self.arrivals: list[tuple[np.ndarray, np.ndarray]] = []  # per bucket: receipt times, delivered flags
        for index in range(count):
            begin = (self.first + index) * bucket_s
            swing = 1 + traffic.diurnal_swing * math.sin(2 * math.pi * begin / 86400)
            n = rng.poisson(traffic.rate_per_second * swing * traffic.factor(begin) * bucket_s)
            sent_at = begin + rng.uniform(0, bucket_s, n)
            p_receipt = np.full(n, traffic.receipt_probability)
            if traffic.drop_from_s is not None:
                dropping = sent_at >= traffic.drop_from_s
                if traffic.drop_until_s is not None:
                    dropping &= sent_at < traffic.drop_until_s
                p_receipt[dropping] *= 1 - traffic.drop_fraction
            receipted = rng.random(n) < p_receipt
            delivered = receipted & (rng.random(n) < traffic.delivered_given_receipt)
            delay = rng.uniform(*traffic.receipt_delay_s, n)
            within = receipted & (delay <= maturity_s)
            order = np.argsort(sent_at[within] + delay[within])
            self.arrivals.append(((sent_at[within] + delay[within])[order], delivered[within][order]))
            scalars["dispatched"][index] = n
            scalars["receipted"][index] = within.sum()
            scalars["delivered"][index] = (within & delivered).sum()
            scalars["attempts"][index] = n
            for name, rate in traffic.error_rates:
                errors[name][index] = rng.binomial(n, rate)
            latency = rng.lognormal(math.log(traffic.latency_median_ms), traffic.latency_sigma, n)
            scalars["latency_count"][index] = n
            scalars["latency_sum_ms"][index] = latency.sum()
            scalars["latency_sumsq_ms"][index] = (latency * latency).sum()
        # Prefix sums as Python floats: the detector asks for many small windows.
        self.prefix = {name: [0.0, *np.cumsum(values).tolist()] for name, values in scalars.items()}
        self.error_prefix = {name: [0.0, *np.cumsum(values).tolist()] for name, values in errors.items()}
        self.now_s = start_s

    def at(self, now_s: float) -> SimulatedSeries:
        """The series as the detector sees it at `now_s` (seconds after EPOCH)."""
        self.now_s = now_s
        return self

    def totals(self, start: datetime, end: datetime) -> Totals:
        start_s, end_s = (start - EPOCH).total_seconds(), (end - EPOCH).total_seconds()
        if end_s > self.now_s:
            raise AssertionError(f"the detector looked {end_s - self.now_s:.0f}s into the future")
        lo = max(0, round(start_s / self.bucket_s) - self.first)
        hi = max(lo, round(end_s / self.bucket_s) - self.first)
        sums = {name: prefix[hi] - prefix[lo] for name, prefix in self.prefix.items()}
        # Cohorts younger than the maturity are not complete yet: count only receipts already in.
        youngest = max(lo, math.floor((self.now_s - self.maturity_s) / self.bucket_s) - self.first - 1)
        for index in range(youngest, hi):
            if (self.first + index + 1) * self.bucket_s + self.maturity_s > self.now_s:
                times, delivered = self.arrivals[index]
                arrived = np.searchsorted(times, self.now_s, side="right")
                sums["receipted"] -= len(times) - arrived
                sums["delivered"] -= int(delivered[arrived:].sum())
        return Totals(
            dispatched=int(sums["dispatched"]),
            receipted=int(sums["receipted"]),
            delivered=int(sums["delivered"]),
            attempts=int(sums["attempts"]),
            errors={name: int(prefix[hi] - prefix[lo]) for name, prefix in self.error_prefix.items()},
            latency_count=int(sums["latency_count"]),
            latency_sum_ms=sums["latency_sum_ms"],
            latency_sumsq_ms=sums["latency_sumsq_ms"],
        )


class SummedSeries:
    """The provider-wide series of several destination countries' simulated series."""

    def __init__(self, parts: Sequence[SimulatedSeries]):
        self.parts = parts

    def at(self, now_s: float) -> SummedSeries:
        for part in self.parts:
            part.at(now_s)
        return self

    def totals(self, start: datetime, end: datetime) -> Totals:
        each = [part.totals(start, end) for part in self.parts]
        errors: dict[str, int] = {}
        for totals in each:
            for name, count in totals.errors.items():
                errors[name] = errors.get(name, 0) + count
        scalars = ("dispatched", "receipted", "delivered", "attempts", "latency_count")
        return Totals(
            **{name: sum(getattr(t, name) for t in each) for name in scalars},
            errors=errors,
            latency_sum_ms=sum(t.latency_sum_ms for t in each),
            latency_sumsq_ms=sum(t.latency_sumsq_ms for t in each),
        )


def country_series(
    countries: dict[str, Traffic], *, seed: int, start_s: float, end_s: float, settings: DetectorSettings
) -> dict[str, SimulatedSeries | SummedSeries]:
    """One provider's traffic to several countries, each its own seeded series, and "" their sum."""
    parts = {
        country: SimulatedSeries(
            traffic,
            seed=seed * 1000 + index,
            start_s=start_s,
            end_s=end_s,
            bucket_s=settings.bucket_seconds,
            maturity_s=settings.receipt_maturity_seconds,
        )
        for index, (country, traffic) in enumerate(sorted(countries.items()))
    }
    return {**parts, "": SummedSeries(list(parts.values()))}


def country_false_alarms(seed: int, settings: DetectorSettings, *, countries: dict[str, Traffic], hours: float = 24):
    """Every finding over `hours` of steady traffic to several countries, judged per country (drops
    only, as the detector judges a country) and provider-wide, at every minute's tick."""
    start = warmup_s(settings)
    end = start + hours * 3600
    series = country_series(countries, seed=seed, start_s=0, end_s=end, settings=settings)
    found = []
    for tick in ticks(start, end):
        now = EPOCH + timedelta(seconds=tick)
        for country, one in series.items():
            findings = detect(one.at(tick), now=now, settings=settings, drops_only=bool(country))
            found += [(country, finding) for finding in findings]
    return found


def warmup_s(settings: DetectorSettings) -> int:
    """History before the first tick: a full baseline behind the longest window."""
    return max(settings.windows_seconds) + settings.baseline_seconds + settings.receipt_maturity_seconds


def ticks(start_s: float, end_s: float, every_s: int = 60, offset_s: float = 5.0):
    """Beat's minute ticks (a few seconds past the minute)."""
    tick = math.floor(start_s / every_s) * every_s + offset_s
    while tick <= end_s:
        if tick >= start_s:
            yield tick
        tick += every_s


def when_detected(seed: int, settings: DetectorSettings, *, drop_at_s: float, traffic: Traffic, horizon_s: float):
    """Seconds from the start of a silent drop to the first receipt-rate finding, or None."""
    traffic = Traffic(**{**traffic.__dict__, "drop_from_s": drop_at_s})
    start = drop_at_s - warmup_s(settings)
    series = SimulatedSeries(
        traffic,
        seed=seed,
        start_s=start,
        end_s=drop_at_s + horizon_s,
        bucket_s=settings.bucket_seconds,
        maturity_s=settings.receipt_maturity_seconds,
    )
    for tick in ticks(drop_at_s, drop_at_s + horizon_s):
        findings = detect(series.at(tick), now=EPOCH + timedelta(seconds=tick), settings=settings)
        if any(f.kind == "receipt_rate_drop" for f in findings):
            return tick - drop_at_s
    return None


def false_alarms(seed: int, settings: DetectorSettings, *, traffic: Traffic, hours: float = 24) -> list:
    """Every finding over `hours` of steady traffic, evaluated at every minute's tick."""
    start = warmup_s(settings)
    end = start + hours * 3600
    series = SimulatedSeries(
        traffic,
        seed=seed,
        start_s=0,
        end_s=end,
        bucket_s=settings.bucket_seconds,
        maturity_s=settings.receipt_maturity_seconds,
    )
    found = []
    for tick in ticks(start, end):
        found += detect(series.at(tick), now=EPOCH + timedelta(seconds=tick), settings=settings)
    return found


def across_seeds(simulation: Callable[..., list], seeds: Sequence[int], **arguments) -> list:
    """simulation(seed, **arguments) for every seed, spread over the machine's cores.

    Each seed is a day of minute ticks in pure Python, independent of the others. Fresh (spawned)
    processes, not forks of the caller: a test process holds threads (the in-process sandbox)
    and open connections, which a fork would copy mid-use.
    """
    workers = max(1, min(len(seeds), os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(partial(simulation, **arguments), seeds, chunksize=max(1, len(seeds) // (4 * workers))))
