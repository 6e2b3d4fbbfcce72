"""Parking status callbacks given up on (placeholder: the dead-letter part of issue 21 replaces
it with one that also records a replayable dead letter)."""

from __future__ import annotations

from datetime import datetime

from messaging.models import Callback, CallbackState


def callbacks_park(*, callback_ids: list[int], reason: str, now: datetime) -> int:
    """Mark these callbacks dead_lettered (those still pending); returns how many. (`reason`
    goes into the dead letter; the deliverer has written last_error already.)"""
    return Callback.objects.filter(pk__any=list(callback_ids), state=CallbackState.PENDING).update(
        state=CallbackState.DEAD_LETTERED, dead_lettered_at=now, lease_expires_at=None
    )
