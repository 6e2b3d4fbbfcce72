"""The claimable predicate: the one definition the claims ask in SQL and on locked rows agree."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import Message

pytestmark = pytest.mark.django_db


def test_the_queryset_and_the_row_say_the_same_of_every_case(make_message):
    now = timezone.now()
    times = [None, now - timedelta(seconds=5), now + timedelta(milliseconds=500), now + timedelta(seconds=5)]
    cases = {}
    for state, lease, next_at in itertools.product(("accepted", "dispatched"), times, times):
        message = make_message(state=state, lease_expires_at=lease, next_attempt_at=next_at)
        cases[message.pk] = message
    in_sql = set(Message.objects.filter(pk__in=cases).claimable(now).values_list("pk", flat=True))
    on_rows = {pk for pk, message in cases.items() if message.is_claimable(now)}
    assert in_sql == on_rows
    # a retry due within the tolerance is claimed, a leased or later one is not
    assert cases and 0 < len(on_rows) < len(cases)
    unleased = set(Message.objects.filter(pk__in=cases).unleased(now).values_list("pk", flat=True))
    assert unleased == {pk for pk, message in cases.items() if message.is_unleased(now)}
