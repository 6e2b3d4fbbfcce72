"""Dead letter retention: with the clock moved past retention, exactly the expired ones go."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.utils import timezone

from messaging.models import DeadLetter, Message
from reconciliation.retention import dead_letters_purge_expired
from reconciliation.tasks import purge_dead_letters

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


@pytest.fixture
def otp_keeps_an_hour(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "CATEGORY_POLICIES": {"otp": {"dlq_retention_seconds": 3600}, "promo": {"base_seconds": 30}},
    }


def aged(park, *, priority, age, category=""):
    """A dead letter parked `age` before the injected clock's now."""
    return park(priority=priority, category=category, parked_at=timezone.now() - age)


def test_each_priority_and_category_keeps_its_own_retention(park, otp_keeps_an_hour):
    keep, gone = set(), set()
    # Defaults: critical 1 day, transactional 14 days, bulk 30 days.
    gone.add(aged(park, priority="critical", age=DAY + timedelta(minutes=1)).pk)
    keep.add(aged(park, priority="critical", age=DAY - timedelta(minutes=1)).pk)
    gone.add(aged(park, priority="transactional", age=15 * DAY).pk)
    keep.add(aged(park, priority="transactional", age=13 * DAY).pk)
    gone.add(aged(park, priority="bulk", age=31 * DAY).pk)
    keep.add(aged(park, priority="bulk", age=29 * DAY).pk)
    # A category with its own retention (an hour), in any priority; a category without one
    # (promo overrides only its backoff) follows its priority.
    gone.add(aged(park, priority="bulk", category="otp", age=timedelta(hours=2)).pk)
    keep.add(aged(park, priority="critical", category="otp", age=timedelta(minutes=30)).pk)
    keep.add(aged(park, priority="bulk", category="promo", age=2 * DAY).pk)
    gone.add(aged(park, priority="bulk", category="promo", age=40 * DAY).pk)

    report = dead_letters_purge_expired(batch_size=2)  # small batches: the loop is exercised

    assert set(DeadLetter.objects.values_list("pk", flat=True)) == keep
    assert report.total == len(gone)
    assert report.removed == {
        ("critical", "*"): 1,
        ("transactional", "*"): 1,
        ("bulk", "*"): 2,
        ("bulk", "otp"): 1,
    }
    assert Message.objects.count() == len(keep) + len(gone)  # the messages themselves stay


def test_moving_the_clock_past_retention_removes_the_rest(park):
    parked = [aged(park, priority=p, age=timedelta(0)) for p in ("critical", "transactional", "bulk")]
    assert dead_letters_purge_expired().total == 0
    assert dead_letters_purge_expired(now=timezone.now() + 2 * DAY).removed == {("critical", "*"): 1}
    assert dead_letters_purge_expired(now=timezone.now() + 31 * DAY).total == 2
    assert not DeadLetter.objects.filter(pk__in=[d.pk for d in parked]).exists()


def test_a_dry_run_counts_without_deleting(park):
    aged(park, priority="critical", age=2 * DAY)
    report = dead_letters_purge_expired(dry_run=True)
    assert report.total == 1 and report.dry_run
    assert DeadLetter.objects.count() == 1


def test_replayed_dead_letters_follow_the_same_retention(park):
    old = aged(park, priority="critical", age=2 * DAY)
    DeadLetter.objects.filter(pk=old.pk).update(replayed_at=timezone.now(), replayed_by="ops")
    assert dead_letters_purge_expired().total == 1


def test_the_beat_job_runs_the_purge_and_is_scheduled(park):
    aged(park, priority="critical", age=2 * DAY)
    keep = aged(park, priority="critical", age=timedelta(hours=1))
    assert purge_dead_letters.apply().get() == 1
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [keep.pk]
    entry = django_settings.CELERY_BEAT_SCHEDULE["reconciliation.purge_dead_letters"]
    assert entry["task"] == purge_dead_letters.name and entry["options"]["queue"] == "maintenance"


def test_the_command_shows_what_it_would_remove_and_removes_it(park, capsys):
    aged(park, priority="critical", age=2 * DAY)
    aged(park, priority="bulk", age=2 * DAY)
    call_command("purge_dead_letters", "--dry-run")
    out = capsys.readouterr().out
    assert "Would remove 1 dead letter" in out and "critical" in out and DeadLetter.objects.count() == 2
    call_command("purge_dead_letters")
    assert "Removed 1 dead letter" in capsys.readouterr().out
    assert list(DeadLetter.objects.values_list("priority", flat=True)) == ["bulk"]


def test_callbacks_done_with_are_deleted_after_their_retention_and_owed_or_shown_ones_stay(make_message, settings):
    from messaging.callbacks.dead_letters import callbacks_park
    from messaging.models import Callback
    from reconciliation.retention import callbacks_purge_expired
    from tests.support.callback_rows import callback_make, endpoint_make

    settings.CONDUCTOR = {**settings.CONDUCTOR, "CALLBACK_RETENTION_SECONDS": 7 * 86400}
    message = make_message()
    endpoint = endpoint_make(message.client)
    now = timezone.now()
    old, recent = now - 8 * DAY, now - 6 * DAY
    rows = {}
    for number, (name, state, written) in enumerate(
        [
            ("delivered_old", "delivered", old),
            ("delivered_recent", "delivered", recent),
            ("pending_old", "pending", old),  # still owed (a replay gives it a fresh window)
            ("parked_old", "pending", old),  # given up on below: its dead letter shows it
            ("parked_purged", "pending", old),  # given up on, its dead letter purged since
        ],
        start=1,
    ):
        rows[name] = callback_make(message, endpoint, sequence=number, state=state, created_at=written)
    callbacks_park(callback_ids=[rows["parked_old"].pk, rows["parked_purged"].pk], reason="gone", now=now)
    DeadLetter.objects.filter(callback=rows["parked_purged"]).delete()

    assert callbacks_purge_expired(now=now, dry_run=True) == 2
    assert Callback.objects.count() == 5
    assert callbacks_purge_expired(now=now, batch_size=1) == 2
    left = set(Callback.objects.values_list("pk", flat=True))
    assert left == {rows[name].pk for name in ("delivered_recent", "pending_old", "parked_old")}
    assert DeadLetter.objects.filter(callback=rows["parked_old"]).exists()


def test_the_beat_job_also_purges_old_delivered_callbacks(make_message):
    from messaging.models import Callback
    from tests.support.callback_rows import callback_make, endpoint_make

    message = make_message()
    callback_make(message, endpoint_make(message.client), state="delivered", created_at=timezone.now() - 30 * DAY)
    purge_dead_letters.apply().get()
    assert not Callback.objects.exists()
