"""Celery tasks of the reconciliation app: thin triggers around its services."""

from __future__ import annotations

from celery import shared_task

from reconciliation.retention import dead_letters_purge_expired


@shared_task(name="reconciliation.purge_dead_letters", ignore_result=True)
def purge_dead_letters() -> int:
    """Delete dead letters past their retention (beat, hourly); returns how many went."""
    return dead_letters_purge_expired().total
