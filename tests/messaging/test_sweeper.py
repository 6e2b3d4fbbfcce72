"""The sweeper: expires overdue messages, re-publishes lost or due ones, leaves the rest alone."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import Message
from messaging.sweeper import messages_sweep

pytestmark = pytest.mark.django_db


def test_overdue_accepted_messages_expire(make_message):
    overdue = make_message(expires_at=timezone.now() - timedelta(seconds=1))
    leased = make_message(
        expires_at=timezone.now() - timedelta(seconds=1), lease_expires_at=timezone.now() + timedelta(seconds=30)
    )
    report = messages_sweep()
    assert report.expired == 1
    assert Message.objects.get(pk=overdue.pk).state == "expired"
    assert Message.objects.get(pk=leased.pk).state == "accepted"  # its worker decides


def test_messages_whose_task_is_stale_or_missing_are_published_again(make_message, settings):
    now = timezone.now()
    stale = make_message(enqueued_at=now - timedelta(seconds=60))
    never = make_message(enqueued_at=None)
    fresh = make_message(enqueued_at=now - timedelta(seconds=1))
    not_due = make_message(enqueued_at=None, next_attempt_at=now + timedelta(minutes=5))
    leased = make_message(enqueued_at=None, lease_expires_at=now + timedelta(seconds=30))
    dispatched = make_message(enqueued_at=None, state="dispatched")
    report = messages_sweep(now=now)
    assert report.enqueued == 2
    swept = set(Message.objects.filter(enqueued_at=now).values_list("pk", flat=True))
    assert swept == {stale.pk, never.pk}
    assert Message.objects.get(pk=fresh.pk).enqueued_at == fresh.enqueued_at
    for untouched in (not_due, leased, dispatched):
        assert Message.objects.get(pk=untouched.pk).enqueued_at is None


def test_a_due_retry_is_published(make_message):
    now = timezone.now()
    due = make_message(enqueued_at=None, next_attempt_at=now - timedelta(seconds=1), priority="bulk")
    assert messages_sweep(now=now).enqueued == 1
    assert Message.objects.get(pk=due.pk).enqueued_at == now


def test_stale_thresholds_are_per_priority(make_message):
    now = timezone.now()
    make_message(priority="bulk", enqueued_at=now - timedelta(seconds=6))  # bulk waits 10 s in tests
    make_message(priority="transactional", enqueued_at=now - timedelta(seconds=6))  # 5 s
    assert messages_sweep(now=now).enqueued == 1
