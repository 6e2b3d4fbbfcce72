"""Fallback drills: the report's arithmetic on rows made here, the refusals, dry run, the forced
state's restore (also on Ctrl-C and after a dead process), the admin and the dashboard."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.management import CommandError, call_command
from django.urls import reverse
from django.utils import timezone

from messaging.models import AttemptOutcome, DispatchAttempt, ProviderRoute, RoutingChange
from messaging.route_health import provider_route_set
from providers.guards import circuit_breaker
from reconciliation import drills
from reconciliation.dashboard import dashboard_data
from reconciliation.drills import DrillRefused, drill_plan, drill_report, drill_run, drills_close_stale
from reconciliation.models import Drill, DrillStatus

pytestmark = pytest.mark.django_db

T = timezone.now().replace(microsecond=0) - timedelta(hours=1)
STARTED, RESTORED, ENDS = T, T + timedelta(seconds=20), T + timedelta(seconds=30)


def at(seconds: float):
    return T + timedelta(seconds=seconds)


def attempt(message, provider, seconds, outcome=AttemptOutcome.ACCEPTED, generation=1, number=1):
    DispatchAttempt.objects.create(
        message=message, number=number, send_generation=generation, provider=provider, channel=message.channel,
        started_at=at(seconds), ended_at=at(seconds), outcome=outcome,
    )  # fmt: skip


def sent(make_message, provider, accepted_s, dispatched_after, delivered_after=None, **fields):
    message = make_message(
        accepted_at=at(accepted_s),
        created_at=at(accepted_s),
        state="delivered" if delivered_after is not None else "dispatched",
        provider=provider,
        dispatched_at=at(accepted_s + dispatched_after),
        delivered_at=at(accepted_s + dispatched_after + delivered_after) if delivered_after is not None else None,
        **fields,
    )
    attempt(message, provider, accepted_s + dispatched_after)
    return message


def report(**overrides):
    values = {
        "provider": "twilio",
        "country": "",
        "mode": "circuit_open",
        "channels": ["sms"],
        "started_at": STARTED,
        "restored_at": RESTORED,
        "ends_at": ENDS,
    }
    return drill_report(**{**values, **overrides})


def test_a_clean_drill_reports_what_moved_where_and_the_latency_of_each_window(make_message):
    for i in range(4):  # before: twilio, 1 s and 2 s to dispatch
        sent(make_message, "twilio", -15 + i, dispatched_after=1 + (i % 2), delivered_after=3)
    skipped = sent(make_message, "vonage", 5, dispatched_after=0.5, delivered_after=4)
    attempt(skipped, "twilio", 5, outcome=AttemptOutcome.SKIPPED, number=0)  # circuit open: not a send
    sent(make_message, "vonage", 6, dispatched_after=1.5, delivered_after=2)
    sent(make_message, "twilio", 25, dispatched_after=0.2, delivered_after=1)
    sent(make_message, "mailgun", 6, dispatched_after=0.1, channel="email", to="a@example.com")  # not drilled

    result = report()

    assert result["moved"] == {"before": {"twilio": 4}, "during": {"vonage": 2}, "after": {"twilio": 1}}
    assert result["accepted"] == {"before": 4, "during": 2, "after": 1}
    assert result["latency"]["before"]["accepted_to_dispatched"] == {"count": 4, "p50": 1.0, "p95": 2.0}
    assert result["latency"]["before"]["dispatched_to_delivered"] == {"count": 4, "p50": 3.0, "p95": 3.0}
    assert result["latency"]["during"]["accepted_to_dispatched"] == {"count": 2, "p50": 0.5, "p95": 1.5}
    assert result["latency"]["after"]["dispatched_to_delivered"] == {"count": 1, "p50": 1.0, "p95": 1.0}
    assert result["affected"] == 2 and result["drilled_share_during"] == 0
    assert result["lost"] == 0 and result["doubled"] == 0
    assert result["status"] == DrillStatus.PASSED and all(result["checks"].values())


def test_lost_waiting_refused_and_doubled_are_told_apart(make_message):
    sent(make_message, "vonage", 2, dispatched_after=0.5)
    never_sent = make_message(accepted_at=at(3), created_at=at(3), next_attempt_at=None)
    make_message(accepted_at=at(4), created_at=at(4), next_attempt_at=ENDS + timedelta(minutes=1))  # retry due later
    make_message(accepted_at=at(5), created_at=at(5), state="dead_lettered", last_error_type="invalid_recipient")
    given_up = make_message(accepted_at=at(6), created_at=at(6), state="failed", last_error_type="circuit_open")
    doubled = sent(make_message, "twilio", 22, dispatched_after=0.1)
    attempt(doubled, "twilio", 23, number=2)  # accepted twice in generation 1
    replayed = sent(make_message, "twilio", 24, dispatched_after=0.1)
    attempt(replayed, "twilio", 25, generation=2, number=2)  # a replay: a new generation, not a double

    result = report()

    assert result["lost"] == 2 and set(result["lost_ids"]) == {str(never_sent.pk), str(given_up.pk)}
    assert result["waiting_for_retry"] == 1 and result["refused_for_recipient"] == 1
    assert result["doubled"] == 1 and result["doubled_ids"] == [str(doubled.pk)]
    assert result["checks"]["nothing_lost"] is False and result["checks"]["nothing_doubled"] is False
    assert result["status"] == DrillStatus.FAILED


def test_traffic_that_stayed_on_the_drilled_provider_fails_the_drill(make_message):
    sent(make_message, "twilio", 3, dispatched_after=0.5)
    sent(make_message, "vonage", 4, dispatched_after=0.5)
    result = report()
    assert result["drilled_share_during"] == 0.5 and result["checks"]["moved"] is False
    assert report(mode="degraded", started_at=at(3.6))["checks"]["moved"] is True  # only vonage's send during


def test_a_send_already_in_flight_when_the_circuit_was_forced_is_not_held_against_it(make_message):
    sent(make_message, "twilio", 0.5, dispatched_after=0.5)  # its round had the permit before the force
    sent(make_message, "vonage", 4, dispatched_after=0.5)
    result = report()
    assert result["moved"]["during"] == {"twilio": 1, "vonage": 1} and result["in_flight_at_start"] == 1
    assert result["drilled_share_during"] == 0 and result["checks"]["moved"] is True


def test_no_traffic_during_the_drill_tests_nothing(make_message):
    result = report()
    assert result["checks"]["traffic"] is False and result["status"] == DrillStatus.FAILED


def test_a_country_drill_counts_that_country_only(make_message):
    sent(make_message, "vonage", 3, dispatched_after=0.5, to="+442071838750")
    sent(make_message, "twilio", 4, dispatched_after=0.5, to="+14155552671")
    result = report(country="GB", mode="degraded")
    assert result["moved"]["during"] == {"vonage": 1} and result["accepted"]["during"] == 1


# Preflight


def test_the_plan_names_the_fallback_and_may_run():
    plan = drill_plan(provider="twilio")
    assert plan.refusals == []
    assert plan.channels == ["sms"] and plan.healthy["sms"] == ["vonage"]
    assert "whatsapp" in plan.alternatives and plan.alternatives["whatsapp"] == []
    assert any("whatsapp" in w for w in plan.warnings)


def test_refused_when_the_fallback_circuit_is_open():
    circuit_breaker("vonage").force_open(seconds=60, reason="incident")
    plan = drill_plan(provider="twilio")
    assert plan.refusals == ["no healthy fallback for sms: vonage (circuit open)"]
    with pytest.raises(DrillRefused):
        drill_run(plan, started_by="test")
    assert not Drill.objects.exists()


def test_refused_when_the_fallback_route_is_degraded_or_drained():
    provider_route_set(provider="vonage", condition="drained", reason="by hand", source="operator:ops")
    assert drill_plan(provider="twilio").refusals == ["no healthy fallback for sms: vonage (route drained)"]


def test_refused_for_a_provider_in_no_route_or_alone_in_its_route(settings):
    assert "nope is in no route" in drill_plan(provider="nope").refusals[0]
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {"sms": ["twilio"], "email": ["mailgun", "smtp"]}}
    assert drill_plan(provider="twilio").refusals == ["no route of twilio has another provider to fall back to"]


def test_refused_while_another_drill_runs_or_with_bad_arguments():
    Drill.objects.create(provider="vonage", mode="circuit_open", started_at=timezone.now(), duration_seconds=60)
    assert any("is running" in r for r in drill_plan(provider="twilio").refusals)
    assert any("between" in r for r in drill_plan(provider="twilio", duration_seconds=5).refusals)
    assert any("per provider" in r for r in drill_plan(provider="twilio", country="GB").refusals)


def test_the_command_refuses_with_a_clear_message_and_changes_nothing():
    circuit_breaker("vonage").force_open(seconds=60, reason="incident")
    with pytest.raises(CommandError, match="no healthy fallback for sms: vonage"):
        call_command("drill", "--provider", "twilio", "--yes")
    assert not Drill.objects.exists() and not circuit_breaker("twilio").snapshot()["forced"]


def test_a_dry_run_says_what_it_would_do_and_changes_nothing(capsys):
    call_command("drill", "--provider", "twilio", "--dry-run")
    out = capsys.readouterr().out
    assert "Drill on twilio: force its circuit breaker open for 180s" in out
    assert "sms: falls back to vonage (healthy)" in out and "Dry run: nothing was changed." in out
    call_command("drill", "--provider", "twilio", "--country", "gb", "--mode", "degraded", "--dry-run")
    assert not Drill.objects.exists() and not RoutingChange.objects.exists() and not ProviderRoute.objects.exists()
    assert not circuit_breaker("twilio").snapshot()["forced"]


def test_without_a_terminal_it_needs_yes():
    with pytest.raises(CommandError, match="add --yes"):
        call_command("drill", "--provider", "twilio")
    assert not Drill.objects.exists()


# Running: force, restore


class FakeTime:
    """sleep() advances clock(); `during` runs at each sleep (to look at the forced state)."""

    def __init__(self, during=None):
        self.now = 0.0
        self.during = during or (lambda: None)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.during()
        self.now += seconds


def test_circuit_open_forces_the_breaker_for_the_drill_and_restores_it():
    seen = []
    fake = FakeTime(lambda: seen.append(circuit_breaker("twilio").snapshot()))
    lines = []
    drill = drill_run(drill_plan(provider="twilio", duration_seconds=20, settle_seconds=5), started_by="t",
                      progress=lines.append, sleep=fake.sleep, clock=fake.clock)  # fmt: skip
    during = seen[: 20 // 5]
    assert all(s["state"] == "open" and s["forced_reason"] == f"drill:{drill.pk}" for s in during)
    assert 45 < during[0]["forced_until"] - circuit_breaker("twilio").clock() <= 50  # duration + margin
    assert not any(s["forced"] for s in seen[len(during) :])
    assert circuit_breaker("twilio").state() == "closed" and not circuit_breaker("twilio").snapshot()["forced"]
    drill.refresh_from_db()
    assert drill.ended_at and drill.report["restored"] is True and drill.report["channels"] == ["sms"]
    assert drill.status == DrillStatus.FAILED and drill.report["checks"]["traffic"] is False  # no traffic here
    assert "Provider restored: yes" in drill.summary
    assert any("restored" in line for line in lines) and any("during 5/20s" in line for line in lines)


def test_degraded_mode_marks_the_route_and_puts_the_previous_condition_back():
    provider_route_set(provider="twilio", country="GB", condition="healthy", weight=3, reason="split", source="op")
    seen = []
    fake = FakeTime(lambda: seen.append(ProviderRoute.objects.get(provider="twilio", country="GB").condition))
    plan = drill_plan(provider="twilio", country="GB", mode="degraded", duration_seconds=10, settle_seconds=0)
    drill = drill_run(plan, started_by="t", sleep=fake.sleep, clock=fake.clock)
    assert seen == ["degraded", "degraded"]
    route = ProviderRoute.objects.get(provider="twilio", country="GB")
    assert route.condition == "healthy" and route.weight == 3
    changes = RoutingChange.objects.filter(source=f"drill:{drill.pk}").order_by("created_at", "id")
    assert [(c.from_condition, c.to_condition) for c in changes] == [("healthy", "degraded"), ("degraded", "healthy")]


def test_ctrl_c_restores_at_once_and_stores_the_drill_as_aborted():
    def interrupt():
        raise KeyboardInterrupt

    fake = FakeTime(interrupt)
    drill = drill_run(drill_plan(provider="twilio", duration_seconds=60), started_by="t", sleep=fake.sleep,
                      clock=fake.clock)  # fmt: skip
    assert drill.status == DrillStatus.ABORTED and drill.report["aborted"] == "interrupted"
    assert not circuit_breaker("twilio").snapshot()["forced"]


def test_an_error_mid_drill_restores_the_provider_and_is_raised():
    def fail():
        raise RuntimeError("database went away")

    fake = FakeTime(fail)
    with pytest.raises(RuntimeError):
        drill_run(drill_plan(provider="twilio", duration_seconds=60), started_by="t", sleep=fake.sleep,
                  clock=fake.clock)  # fmt: skip
    assert Drill.objects.get().status == DrillStatus.ABORTED
    assert not circuit_breaker("twilio").snapshot()["forced"]


def test_a_drill_left_running_by_a_dead_process_is_closed_and_its_route_restored():
    long_ago = timezone.now() - timedelta(hours=1)
    dead = Drill.objects.create(
        provider="twilio", mode="degraded", started_at=long_ago, duration_seconds=60,
        report={"settle_seconds": 60, "previous_condition": "healthy", "channels": ["sms"]},
    )  # fmt: skip
    provider_route_set(provider="twilio", condition="degraded", reason="drill", source=f"drill:{dead.pk}")
    recent = Drill.objects.create(
        provider="vonage", mode="circuit_open", started_at=timezone.now(), duration_seconds=60
    )

    assert drills_close_stale() == [dead]
    dead.refresh_from_db()
    assert dead.status == DrillStatus.ABORTED and dead.ended_at and "process died" in dead.summary
    assert ProviderRoute.objects.get(provider="twilio", country="").condition == "healthy"
    recent.refresh_from_db()
    assert recent.status == DrillStatus.RUNNING


# Shown


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_superuser("ops", password="pw-for-tests"))
    return client


def finished_drill(make_message) -> Drill:
    sent(make_message, "twilio", -5, dispatched_after=1)
    sent(make_message, "vonage", 5, dispatched_after=1, delivered_after=2)
    drill = Drill.objects.create(
        provider="twilio", mode="circuit_open", started_at=STARTED, ended_at=ENDS, duration_seconds=20,
        report={"settle_seconds": 10, "channels": ["sms"]},
    )  # fmt: skip
    drill.report.update(report())
    drill.status = drill.report["status"]
    drill.summary = drills.drill_summary(drill)
    drill.save()
    return drill


def test_the_dashboard_shows_the_last_drill_or_none_yet(staff, make_message):
    assert dashboard_data()["last_drill"] is None
    assert "no drill yet" in staff.get(reverse("dashboard")).content.decode()
    finished_drill(make_message)
    assert dashboard_data()["last_drill"]["provider"] == "twilio"
    page = staff.get(reverse("dashboard")).content.decode()
    assert f"last drill: {STARTED:%Y-%m-%d %H:%M} UTC, twilio, passed" in page


def test_the_admin_shows_the_report_read_only(staff, make_message):
    drill = finished_drill(make_message)
    assert drill.summary.startswith("PASSED. Drill on twilio (circuit_open, 20s). Sends before: twilio 1; during: ")
    listing = staff.get(reverse("admin:reconciliation_drill_changelist"))
    assert listing.status_code == 200 and "twilio" in listing.content.decode()
    page = staff.get(reverse("admin:reconciliation_drill_change", args=[drill.pk])).content.decode()
    assert "sent via vonage" in page and "nothing lost: ok" in page and "accepted → dispatched p50 / p95" in page
    assert staff.post(reverse("admin:reconciliation_drill_delete", args=[drill.pk])).status_code == 403
