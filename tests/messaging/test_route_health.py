"""hops_ordered: a message's route as the providers' conditions and weights order it (pure, seeded draws)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from messaging.checks import check_messaging_settings
from messaging.route_health import RouteState, hops_ordered, probe_share_for
from messaging.routing import Hop

US = "+14155552671"
GB = "+447400123456"
SHARE = 0.05


def route(to: str = US, email: str = "") -> list[Hop]:
    hops = [Hop("sms", to, "twilio"), Hop("sms", to, "vonage")]
    return hops + ([Hop("email", email, "mailgun"), Hop("email", email, "smtp")] if email else [])


def states(*rows: tuple[str, str, str, int | None]) -> dict[tuple[str, str], RouteState]:
    return {
        (provider, country): RouteState(provider, country, condition, weight)
        for provider, country, condition, weight in rows
    }


def providers(hops: list[Hop]) -> list[str]:
    return [hop.provider for hop in hops]


def first_places(to: str, table, *, priority: str = "bulk", n: int = 10_000, seed: int = 1) -> Counter:
    draw = random.Random(seed).random
    return Counter(
        hops_ordered(route(to), priority=priority, states=table, draw=draw, probe_share=SHARE)[0].provider
        for _ in range(n)
    )


def never(*_):
    raise AssertionError("no draw expected")


def test_no_states_leaves_the_route_as_configured_without_a_draw():
    hops = route(email="ada@example.com")
    assert hops_ordered(hops, priority="bulk", states={}, draw=never, probe_share=SHARE) is hops
    other = states(("smtp", "", "drained", None))
    assert providers(hops_ordered(route(), priority="bulk", states=other, draw=never, probe_share=SHARE)) == [
        "twilio",
        "vonage",
    ]


def test_a_drained_provider_goes_behind_every_other_provider_of_its_channel_only():
    hops = route(email="ada@example.com")
    table = states(("twilio", "", "drained", None), ("mailgun", "", "drained", None))
    ordered = hops_ordered(hops, priority="critical", states=table, draw=never, probe_share=SHARE)
    # Still tried on failure, but after the channel's others; never moved across channels.
    assert providers(ordered) == ["vonage", "twilio", "smtp", "mailgun"]
    assert sorted(ordered, key=hops.index) == hops  # the same hops, none lost


def test_a_drained_provider_is_still_the_last_resort_when_it_is_the_channels_only_one():
    hops = [Hop("whatsapp", US, "twilio"), Hop("email", "ada@example.com", "mailgun")]
    table = states(("twilio", "", "drained", None))
    assert hops_ordered(hops, priority="bulk", states=table, draw=never, probe_share=SHARE) == hops


def test_drained_for_one_country_moves_that_country_only():
    table = states(("twilio", "US", "drained", None))
    assert providers(hops_ordered(route(US), priority="bulk", states=table, draw=never, probe_share=SHARE)) == [
        "vonage",
        "twilio",
    ]
    assert providers(hops_ordered(route(GB), priority="bulk", states=table, draw=never, probe_share=SHARE)) == [
        "twilio",
        "vonage",
    ]


def test_the_worse_of_a_countrys_row_and_the_every_country_row_applies():
    # An operator's drain of every country is not undone by the detector restoring one country.
    table = states(("twilio", "", "drained", None), ("twilio", "GB", "healthy", None))
    assert (
        providers(hops_ordered(route(GB), priority="bulk", states=table, draw=never, probe_share=SHARE))[0] == "vonage"
    )
    # A country degraded under a healthy every-country row is degraded there only.
    table = states(("twilio", "", "healthy", 1), ("twilio", "US", "degraded", None), ("vonage", "", "healthy", 1))
    assert first_places(US, table, priority="critical", n=100) == {"vonage": 100}
    assert 30 < first_places(GB, table, n=100)["twilio"] < 70  # the every-country weights split GB


def test_a_countrys_weight_wins_over_the_every_country_weight():
    table = states(("twilio", "", "healthy", 1), ("twilio", "US", "healthy", 0), ("vonage", "", "healthy", 1))
    assert first_places(US, table, n=100) == {"vonage": 100}


def test_a_degraded_provider_keeps_the_probe_share_of_bulk_first():
    firsts = first_places(US, states(("twilio", "US", "degraded", None)), priority="bulk")
    assert abs(firsts["twilio"] / 10_000 - SHARE) < 0.01  # 5 % ± 1 point over 10,000 seeded draws
    assert firsts["twilio"] + firsts["vonage"] == 10_000


def test_transactional_probes_at_the_full_share_and_critical_never():
    table = states(("twilio", "", "degraded", None))
    transactional = first_places(US, table, priority="transactional")["twilio"] / 10_000
    assert probe_share_for("transactional", SHARE) == SHARE
    assert abs(transactional - SHARE) < 0.01  # a 2FA stream alone must show a recovery (issue 24)
    assert first_places(US, table, priority="critical")["twilio"] == 0
    assert probe_share_for("critical", 1.0) == 0.0


def test_a_degraded_provider_is_still_tried_after_the_healthy_ones():
    table = states(("twilio", "", "degraded", None))
    ordered = hops_ordered(route(), priority="critical", states=table, draw=random.Random(3).random, probe_share=1.0)
    assert providers(ordered) == ["vonage", "twilio"]


def test_drained_comes_after_degraded():
    hops = [Hop("email", "ada@example.com", name) for name in ("mailgun", "smtp", "other")]
    table = states(("mailgun", "", "drained", None), ("smtp", "", "degraded", None))
    ordered = hops_ordered(hops, priority="critical", states=table, draw=never, probe_share=SHARE)
    assert providers(ordered) == ["other", "smtp", "mailgun"]


def test_weights_share_the_first_place_in_proportion():
    table = states(("twilio", "", "healthy", 3), ("vonage", "", "healthy", 1))
    firsts = first_places(US, table, n=20_000)
    assert abs(firsts["twilio"] / 20_000 - 0.75) < 0.015
    assert abs(firsts["vonage"] / 20_000 - 0.25) < 0.015


def test_weight_zero_or_none_is_never_drawn_first_and_keeps_route_order_behind():
    assert first_places(US, states(("vonage", "", "healthy", 1)), n=200) == {"vonage": 200}
    table = states(("twilio", "", "healthy", 0), ("vonage", "", "healthy", 2))
    assert first_places(US, table, n=200) == {"vonage": 200}
    # A drained provider's weight counts for nothing.
    table = states(("twilio", "", "drained", 5), ("vonage", "", "healthy", None))
    assert first_places(US, table, n=200) == {"vonage": 200}


def test_the_probe_is_drawn_once_per_message():
    calls = []

    def draw():
        calls.append(1)
        return 0.0  # probes

    table = states(("twilio", "", "degraded", None), ("mailgun", "", "degraded", None))
    ordered = hops_ordered(route(email="ada@example.com"), priority="bulk", states=table, draw=draw, probe_share=SHARE)
    assert providers(ordered) == ["twilio", "vonage", "mailgun", "smtp"] and len(calls) == 1


@pytest.mark.parametrize("share,refused", [(0, False), (0.05, False), (1, False), (1.5, True), (-0.1, True)])
def test_the_probe_share_is_checked_at_start_up(settings, share, refused):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTE_PROBE_SHARE": share}
    ids = [error.id for error in check_messaging_settings()]
    assert ("conductor.E101" in ids) is refused


def test_route_state_is_the_worse_of_the_country_row_and_the_every_country_row():
    from messaging.route_health import RouteState, route_state

    every = RouteState("twilio", "", "drained", None)
    gb = RouteState("twilio", "GB", "healthy", None)
    assert route_state("twilio", "GB", {("twilio", ""): every, ("twilio", "GB"): gb}).condition == "drained"
    degraded_gb = RouteState("twilio", "GB", "degraded", None)
    healthy_every = RouteState("twilio", "", "healthy", 3)
    combined = route_state("twilio", "GB", {("twilio", ""): healthy_every, ("twilio", "GB"): degraded_gb})
    assert (combined.condition, combined.weight) == ("degraded", 3)  # the country's has no weight of its own
    assert route_state("twilio", "US", {("twilio", "GB"): degraded_gb}) is None
    assert route_state("twilio", "", {("twilio", ""): every}) is every
