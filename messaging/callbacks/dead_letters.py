"""Parking status callbacks given up on as dead letters of their own kind (kind "callback").

Called by the deliverer (a final answer, or the retry window spent) and when an endpoint is
disabled. The callback row is marked dead_lettered and a DeadLetter records it with its body and
attempt log, the message's channel, priority and category (so the message filters, the replay
doors and the retention of messages apply to it). Replay lives in messaging.replay.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.db import connection, transaction

from messaging.models import Callback, CallbackState, DeadLetter, DeadLetterKind, ErrorType

logger = logging.getLogger(__name__)

# Statuses that mean "try later" (the rest of 4xx, and 3xx, are final): the deliverer's rule too.
RETRIED_STATUSES = frozenset({408, 409, 429})


def callback_error_type(attempt: dict[str, Any] | None) -> str:
    """The error vocabulary of dead letters (providers.types.ErrorType) for a callback's last
    attempt: the endpoint plays the provider's part."""
    if not attempt:
        return ErrorType.UNKNOWN
    status = attempt.get("status")
    if status is None:
        error = str(attempt.get("error") or "").lower()
        if "timeout" in error or "timed out" in error:
            return ErrorType.PROVIDER_TIMEOUT
        return ErrorType.CONNECTION_ERROR if error else ErrorType.UNKNOWN
    if status == 429:
        return ErrorType.RATE_LIMITED
    if status == 408:
        return ErrorType.PROVIDER_TIMEOUT
    if status >= 500 or status in RETRIED_STATUSES:
        return ErrorType.PROVIDER_5XX
    return ErrorType.REJECTED


def callbacks_park(*, callback_ids: list[int], reason: str, now: datetime) -> int:
    """Mark these callbacks dead_lettered (those still pending: a concurrent delivery or park wins)
    and record a dead letter for each, in the caller's transaction if any. Returns how many."""
    if not callback_ids:
        return 0
    table = Callback._meta.db_table
    with transaction.atomic():
        with connection.cursor() as cursor:
            # One statement that says which rows it changed: a racing park or delivery is left out.
            cursor.execute(
                f"UPDATE {table} SET state = %s, dead_lettered_at = %s, lease_expires_at = NULL "  # noqa: S608
                "WHERE id = ANY(%s) AND state = %s RETURNING id",
                [CallbackState.DEAD_LETTERED, now, list(callback_ids), CallbackState.PENDING],
            )
            parked_ids = [row[0] for row in cursor.fetchall()]
        if not parked_ids:
            return 0
        rows = Callback.objects.filter(pk__in=parked_ids).select_related("message").order_by("pk")
        DeadLetter.objects.bulk_create([_dead_letter(callback, reason, now) for callback in rows])
    logger.info("%d callbacks parked as dead letters (%s)", len(parked_ids), reason[:200])
    return len(parked_ids)


def _dead_letter(callback: Callback, reason: str, now: datetime) -> DeadLetter:
    message = callback.message
    last = callback.attempt_log[-1] if callback.attempt_log else None
    status = last.get("status") if last else None
    return DeadLetter(
        kind=DeadLetterKind.CALLBACK,
        callback=callback,
        message=message,
        client_id=message.client_id,
        send_generation=message.send_generation,
        state=message.state,
        channel=message.channel,
        priority=message.priority,
        category=message.category,
        provider="",
        error_type=callback_error_type(last),
        error_code=str(status) if status is not None else "",
        error_message=callback.last_error or (str(last.get("error") or "") if last else ""),
        reason=reason[:2000],
        unknown_outcome=False,  # a resend carries the same webhook-id: receivers de-duplicate
        payload=callback.payload,
        attempts=callback.attempt_log,
        created_at=now,
    )
