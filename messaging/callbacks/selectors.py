"""Reads about status callbacks for metrics and the dashboard."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Count, Min

from messaging.models import Callback, CallbackState


@dataclass(frozen=True)
class EndpointBacklog:
    endpoint_id: int
    due: int  # pending callbacks whose time has come (sent or not yet)
    oldest_due_at: datetime


def callbacks_backlog_by_endpoint(*, now: datetime, limit: int = 20) -> list[EndpointBacklog]:
    """The endpoints whose oldest due callback has waited longest, at most `limit` of them (a
    bounded number of series however many endpoints there are): one GROUP BY over the pending
    index, which holds only what is not yet delivered or given up on."""
    rows = (
        Callback.objects.filter(state=CallbackState.PENDING, next_attempt_at__lte=now)
        .values("endpoint_id")
        .annotate(due=Count("*"), oldest=Min("next_attempt_at"))
        .order_by("oldest")[:limit]
    )
    return [EndpointBacklog(row["endpoint_id"], row["due"], row["oldest"]) for row in rows]


def callbacks_pending_count() -> int:
    return Callback.objects.filter(state=CallbackState.PENDING).count()
