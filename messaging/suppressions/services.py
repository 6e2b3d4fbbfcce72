"""Adding and lifting suppressions. Every writer goes through here (API, admin, CSV import, inbound
STOP/START, provider errors, ESP events, one-click unsubscribe), so one rule decides what a
suppression covers and every change is logged the same way (the address masked)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from messaging.logging import masked
from messaging.metrics import suppression_added_count
from messaging.models import ApiClient, Suppression, SuppressionReason
from messaging.suppressions.selectors import suppression_address

logger = logging.getLogger(__name__)

# An address that cannot receive stops every message, the opt-out-exempt categories too.
COVERS_EXEMPT_REASONS = frozenset({SuppressionReason.HARD_BOUNCE})


def suppression_add(
    *,
    client: ApiClient,
    channel: str,
    address: str,
    reason: str,
    scope: str = "",
    source: str = "",
    note: str = "",
    covers_exempt: bool | None = None,
    now: datetime | None = None,
) -> tuple[Suppression, bool]:
    """Suppress `address` for the client on `channel` in `scope` ("" every non-exempt category).
    Idempotent: an active suppression of the same (channel, address, scope) is returned as it is.
    Returns (suppression, created). `covers_exempt` None: by the reason (a hard bounce does)."""
    address = suppression_address(channel, address)
    if covers_exempt is None:
        covers_exempt = reason in COVERS_EXEMPT_REASONS
    existing = _active(client.pk, channel, address, scope)
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            suppression = Suppression.objects.create(
                client=client,
                channel=channel,
                address=address,
                scope=scope,
                reason=reason,
                covers_exempt=covers_exempt,
                source=source[:200],
                note=note,
                created_at=now or timezone.now(),
            )
    except IntegrityError:  # a concurrent writer added it first (suppression_unique_active)
        existing = _active(client.pk, channel, address, scope)
        if existing is None:
            raise
        return existing, False
    suppression_added_count(channel=channel, reason=reason)
    logger.info(
        "suppression added for %s: %s %s%s (%s, %s)",
        client.name,
        channel,
        masked(address),
        f" scope {scope}" if scope else "",
        reason,
        source or "no source",
        extra={"event": "suppression", "client": client.name, "channel": channel, "reason": reason},
    )
    return suppression, True


@dataclass(frozen=True)
class SuppressionEntry:
    """One suppression to add in bulk (a CSV line): the address already normalized."""

    channel: str
    address: str
    reason: str
    scope: str = ""
    note: str = ""


def suppressions_add_many(
    *, client: ApiClient, entries: Sequence[SuppressionEntry], source: str, dry_run: bool = False
) -> list[bool]:
    """suppression_add for many at once (an import of thousands of lines in a few statements):
    per entry, whether it is new (False: an active one of the same channel, address and scope
    exists, or came earlier in `entries`). The same rules; `dry_run` writes nothing."""
    entries = [
        SuppressionEntry(e.channel, suppression_address(e.channel, e.address), e.reason, e.scope, e.note)
        for e in entries
    ]
    seen = set(
        Suppression.objects.filter(
            client=client, lifted_at__isnull=True, address__in={e.address for e in entries}
        ).values_list("channel", "address", "scope")
    )
    new: list[bool] = []
    for entry in entries:
        key = (entry.channel, entry.address, entry.scope)
        new.append(key not in seen)
        seen.add(key)
    fresh = [entry for entry, is_new in zip(entries, new, strict=True) if is_new]
    if dry_run or not fresh:
        return new
    now = timezone.now()
    # A concurrent writer's row wins (suppression_unique_active): ours is then not stored, as in
    # suppression_add, where the other is returned.
    Suppression.objects.bulk_create(
        [
            Suppression(
                client=client,
                channel=e.channel,
                address=e.address,
                scope=e.scope,
                reason=e.reason,
                covers_exempt=e.reason in COVERS_EXEMPT_REASONS,
                source=source[:200],
                note=e.note,
                created_at=now,
            )
            for e in fresh
        ],
        batch_size=1000,
        ignore_conflicts=True,
    )
    for entry in fresh:
        suppression_added_count(channel=entry.channel, reason=entry.reason)
    logger.info(
        "%d suppressions added for %s (%s)",
        len(fresh),
        client.name,
        source or "no source",
        extra={"event": "suppression", "client": client.name, "count": len(fresh)},
    )
    return new


def suppression_lift(*, suppression: Suppression, reason: str, by: str = "", now: datetime | None = None) -> bool:
    """Lift one suppression (the row stays, with when, why and by whom). False if it was lifted already."""
    lifted = Suppression.objects.filter(pk=suppression.pk, lifted_at__isnull=True).update(
        lifted_at=now or timezone.now(), lifted_reason=reason[:500], lifted_by=by[:200]
    )
    if lifted:
        suppression.refresh_from_db()
        logger.info(
            "suppression %s lifted for client %s: %s %s (%s)",
            suppression.pk,
            suppression.client_id,
            suppression.channel,
            masked(suppression.address),
            reason,
            extra={"event": "suppression_lifted", "channel": suppression.channel},
        )
    return bool(lifted)


def suppressions_lift_matching(
    *,
    client: ApiClient,
    channel: str,
    address: str,
    reasons: Iterable[str],
    reason: str,
    by: str = "",
    now: datetime | None = None,
) -> int:
    """Lift the client's active suppressions of `address` on `channel` that have one of `reasons`
    (START lifts what STOP and the provider's opt-out added, not a bounce or a manual one)."""
    rows = Suppression.objects.filter(
        client=client,
        channel=channel,
        address=suppression_address(channel, address),
        reason__in=list(reasons),
        lifted_at__isnull=True,
    )
    return sum(suppression_lift(suppression=row, reason=reason, by=by, now=now) for row in rows)


def _active(client_id: int, channel: str, address: str, scope: str) -> Suppression | None:
    return Suppression.objects.filter(
        client_id=client_id, channel=channel, address=address, scope=scope, lifted_at__isnull=True
    ).first()
