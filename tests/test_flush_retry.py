"""The suite's own guard: a teardown flush chosen as a deadlock victim is retried (conftest)."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError, connection


@pytest.mark.django_db(transaction=True)
def test_a_flush_that_deadlocks_once_is_retried(monkeypatch):
    real = connection.ops.execute_sql_flush
    calls = []

    def deadlock_once(sql_list):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("deadlock detected")
        return real(sql_list)

    monkeypatch.setattr(connection.ops, "execute_sql_flush", deadlock_once)
    call_command("flush", interactive=False, verbosity=0)
    assert len(calls) == 2


@pytest.mark.django_db(transaction=True)
def test_any_other_flush_error_still_fails(monkeypatch):
    def broken(sql_list):
        raise OperationalError("relation does not exist")

    monkeypatch.setattr(connection.ops, "execute_sql_flush", broken)
    with pytest.raises(CommandError):
        call_command("flush", interactive=False, verbosity=0)
