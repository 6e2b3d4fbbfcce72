"""Detection by destination country and the routes it degrades and restores (issue 24): seeded
simulated traffic to several countries, judged tick by tick on an injected clock, with the
alerts and routes in the database."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest

from messaging.models import ProviderRoute, RouteCondition, RoutingChange
from messaging.route_health import provider_route_set
from reconciliation.alerts import anomalies_judge
from reconciliation.anomalies import DROP_KINDS, DetectorSettings
from reconciliation.models import Alert
from reconciliation.route_actions import route_degrade, route_restore, routes_follow_alerts
from tests.support.delivery_simulation import (
    EPOCH,
    Traffic,
    across_seeds,
    country_false_alarms,
    country_series,
    ticks,
    warmup_s,
)

SETTINGS = DetectorSettings()
# Twilio's traffic at 20 msg/s, to four countries of different sizes; the sandbox's "+44" rule
# drops 30 % of the British share and nothing elsewhere.
RATES = {"US": 10.0, "GB": 6.0, "FR": 3.0, "DE": 1.0}
DROP_AT = 10 * 3600.0
SEED = 7
PROBE_SHARE = 0.05


def simulate(gb: Traffic, *, until_s: float, seed: int = SEED):
    """Judge twilio's traffic each minute from DROP_AT on; yields each tick after judging it."""
    countries = {country: gb if country == "GB" else Traffic(rate) for country, rate in RATES.items()}
    series = country_series(
        countries, seed=seed, start_s=DROP_AT - warmup_s(SETTINGS), end_s=until_s, settings=SETTINGS
    )
    for tick in ticks(DROP_AT, until_s):
        judged = {("sms", "twilio", country): one.at(tick) for country, one in series.items()}
        anomalies_judge(judged, now=EPOCH + timedelta(seconds=tick), settings=SETTINGS)
        yield tick


def route(country: str) -> ProviderRoute | None:
    return ProviderRoute.objects.filter(provider="twilio", country=country).first()


def first_gb_alert_tick(run) -> float:
    for tick in run:
        if Alert.objects.filter(country="GB", kind__in=DROP_KINDS).exists():
            return tick
    pytest.fail("no alert for GB")


@pytest.mark.django_db
def test_a_30_percent_drop_to_one_country_names_it_and_degrades_that_route_on_the_same_tick():
    gb = Traffic(RATES["GB"], drop_from_s=DROP_AT, drop_fraction=0.3)
    run = simulate(gb, until_s=DROP_AT + 1200)
    tick = first_gb_alert_tick(run)
    assert tick - DROP_AT <= 600
    alert = Alert.objects.filter(country="GB").earliest("opened_at")
    assert (alert.provider, alert.channel, alert.opened_at) == ("twilio", "sms", EPOCH + timedelta(seconds=tick))
    degraded = route("GB")
    assert (degraded.condition, degraded.source) == (RouteCondition.DEGRADED, "detector")
    assert "twilio to GB" in degraded.reason
    # Other countries, and twilio everywhere, untouched: then and for the next ten minutes of
    # undiminished traffic, while the provider-wide rate shows the British drop too.
    for _ in run:
        pass
    assert list(ProviderRoute.objects.values_list("country", "condition")) == [("GB", RouteCondition.DEGRADED)]
    assert RoutingChange.objects.count() == 1
    print(f"alerted and degraded {tick - DROP_AT:.0f} s after the drop began")


@pytest.mark.django_db
def test_when_the_drop_stops_a_probe_share_brings_the_route_back_within_10_minutes():
    gb = Traffic(RATES["GB"], drop_from_s=DROP_AT, drop_fraction=0.3)
    degraded_at = first_gb_alert_tick(simulate(gb, until_s=DROP_AT + 600))
    Alert.objects.all().delete()
    ProviderRoute.objects.all().delete()
    RoutingChange.objects.all().delete()
    # The same traffic, now with only the probe share to twilio from the next minute on (the rest
    # goes to the next provider), and the drop stopping five minutes after the degradation.
    moved = math.ceil(degraded_at / 60) * 60
    stopped = moved + 300.0
    gb = Traffic(
        RATES["GB"], drop_from_s=DROP_AT, drop_fraction=0.3, drop_until_s=stopped, rate_changes=((moved, PROBE_SHARE),)
    )
    restored_at = None
    for tick in simulate(gb, until_s=stopped + 900):
        if tick == degraded_at:
            assert route("GB").condition == RouteCondition.DEGRADED  # the same tick as in the first run
        if tick > degraded_at and route("GB").condition == RouteCondition.HEALTHY:
            restored_at = tick
            break
    assert restored_at is not None and restored_at - stopped <= 600, restored_at
    assert not Alert.objects.filter(country="GB", resolved_at=None).exists()
    log = list(RoutingChange.objects.order_by("created_at").values_list("to_condition", "source"))
    assert log == [("degraded", "detector"), ("healthy", "detector")]
    print(f"restored {restored_at - stopped:.0f} s after the drop stopped, on a {PROBE_SHARE:.0%} probe share")


@pytest.mark.django_db
def test_while_the_drop_goes_on_the_probe_share_keeps_the_route_degraded():
    gb = Traffic(RATES["GB"], drop_from_s=DROP_AT, drop_fraction=0.3)
    degraded_at = first_gb_alert_tick(simulate(gb, until_s=DROP_AT + 600))
    Alert.objects.all().delete()
    ProviderRoute.objects.all().delete()
    moved = math.ceil(degraded_at / 60) * 60
    gb = Traffic(RATES["GB"], drop_from_s=DROP_AT, drop_fraction=0.3, rate_changes=((moved, PROBE_SHARE),))
    for _ in simulate(gb, until_s=degraded_at + 3600):
        pass
    assert route("GB").condition == RouteCondition.DEGRADED
    assert Alert.objects.filter(country="GB", resolved_at=None).exists()


# --- no false degradation -------------------------------------------------------------------------
# Countries of every size: judged on their own (US, GB, FR), on the longest windows only (DE),
# or too small to reach the minimum samples and judged only in the provider-wide cohort (BR).
STEADY = {"US": Traffic(10.0), "GB": Traffic(5.0), "FR": Traffic(1.0), "DE": Traffic(0.3), "BR": Traffic(0.03)}


def test_24_hours_of_steady_traffic_to_countries_of_every_size_raise_no_alert():
    days = across_seeds(country_false_alarms, range(20), settings=SETTINGS, countries=STEADY)
    found = [finding for day in days for finding in day]
    assert found == []


@pytest.mark.django_db
def test_24_hours_of_steady_traffic_through_the_detector_degrade_nothing():
    series = country_series(STEADY, seed=99, start_s=0, end_s=warmup_s(SETTINGS) + 86400, settings=SETTINGS)
    for tick in ticks(warmup_s(SETTINGS), warmup_s(SETTINGS) + 86400):
        judged = {("sms", "twilio", country): one.at(tick) for country, one in series.items()}
        anomalies_judge(judged, now=EPOCH + timedelta(seconds=tick), settings=SETTINGS)
    assert not Alert.objects.exists()
    assert not RoutingChange.objects.exists()


# --- what the detector never overrides ------------------------------------------------------------
@pytest.mark.django_db
def test_an_operators_drain_is_never_undone_by_the_detector():
    provider_route_set(
        provider="twilio", country="GB", condition="drained", reason="carrier work", source="operator:ada"
    )
    gb = Traffic(RATES["GB"], drop_from_s=DROP_AT, drop_fraction=0.3)
    first_gb_alert_tick(simulate(gb, until_s=DROP_AT + 600))
    drained = route("GB")
    assert (drained.condition, drained.source) == (RouteCondition.DRAINED, "operator:ada")
    alerts = list(Alert.objects.filter(country="GB"))
    for alert in alerts:
        alert.resolved_at = alert.opened_at
        alert.save()
    routes_follow_alerts(opened=[], resolved=alerts, series={}, now=EPOCH, settings=SETTINGS, summary=str)
    assert route("GB").condition == RouteCondition.DRAINED
    assert RoutingChange.objects.count() == 1  # the operator's own


@pytest.mark.django_db
def test_a_country_is_not_degraded_under_a_drain_of_the_whole_provider():
    provider_route_set(provider="twilio", condition="drained", reason="incident", source="operator:ada")
    assert route_degrade(provider="twilio", country="GB", reason="drop") is None
    assert route("GB") is None  # its own row would take precedence over the drain


@pytest.mark.django_db
def test_only_the_detectors_own_degradation_is_restored():
    provider_route_set(provider="twilio", country="GB", condition="degraded", reason="drill", source="drill:4")
    assert route_restore(provider="twilio", country="GB", reason="recovered") is None
    assert route("GB").condition == RouteCondition.DEGRADED
    route_degrade(provider="twilio", country="FR", reason="drop")
    provider_route_set(provider="twilio", country="FR", weight=3, reason="split", source="operator:ada")
    assert route_restore(provider="twilio", country="FR", reason="recovered") is None  # an operator changed it since
    route_degrade(provider="twilio", country="DE", reason="drop")
    assert route_restore(provider="twilio", country="DE", reason="recovered").to_condition == RouteCondition.HEALTHY
