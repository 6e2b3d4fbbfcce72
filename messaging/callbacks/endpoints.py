"""Clients' callback endpoints: create (with a fresh secret), update, delete, rotate the secret,
disable and enable. The API, the admin and reconciliation's auto-disable all write through here."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from messaging.callbacks.dead_letters import callbacks_park
from messaging.callbacks.signing import new_secret
from messaging.conf import messaging_setting
from messaging.logging import redacted_url
from messaging.models import ApiClient, Callback, CallbackEndpoint, CallbackState

logger = logging.getLogger(__name__)

# Secrets kept at once: rotating again within the overlap keeps the older ones signing too, but
# every one is another signature in each request's header; a receiver needs only one.
MAX_SECRETS = 5
UPDATABLE_FIELDS = frozenset({"url", "events", "description", "enabled", "per_message"})
# Pending callbacks parked per statement when an endpoint is disabled.
PARK_CHUNK = 1000
ENDPOINT_DISABLED = "endpoint_disabled"


class EndpointUrlTaken(Exception):
    """The client already has an endpoint with this URL (one endpoint per URL and client)."""

    def __init__(self, endpoint_id: int):
        self.endpoint_id = endpoint_id
        super().__init__(f"You already have an endpoint with this URL (id {endpoint_id}).")


def endpoint_secret_new() -> str:
    """A Standard Webhooks secret: "whsec_" and the base64 of random bytes (the key HMAC uses)."""
    return new_secret()


def secrets_active(stored: list[dict[str, Any]], *, now: datetime) -> list[dict[str, Any]]:
    """The stored secrets that still sign at `now`, newest first (an expired one is dropped)."""
    return [s for s in stored if s.get("expires_at") is None or datetime.fromisoformat(s["expires_at"]) > now]


def callback_endpoint_create(
    *,
    client: ApiClient,
    url: str,
    events: list[str] | None = None,
    description: str = "",
    enabled: bool = True,
    per_message: bool = False,
    now: datetime | None = None,
) -> tuple[CallbackEndpoint, str]:
    """A new endpoint and its first secret (returned for the client to keep; also readable later)."""
    now = now or timezone.now()
    secret = endpoint_secret_new()
    existing = CallbackEndpoint.objects.filter(client=client, url=url).values_list("pk", flat=True).first()
    if existing is not None:
        raise EndpointUrlTaken(existing)
    try:
        with transaction.atomic():
            endpoint = CallbackEndpoint.objects.create(
                client=client,
                url=url,
                events=list(events or []),
                description=description,
                enabled=enabled,
                per_message=per_message,
                disabled_at=None if enabled else now,
                disabled_reason="" if enabled else "created disabled",
                secrets=[{"secret": secret, "created_at": now.isoformat(), "expires_at": None}],
            )
    except IntegrityError:  # created by a concurrent request since the check
        raise EndpointUrlTaken(
            CallbackEndpoint.objects.filter(client=client, url=url).values_list("pk", flat=True).first() or 0
        ) from None
    logger.info("callback endpoint %s created for %s: %s", endpoint.pk, client.name, redacted_url(url))
    return endpoint, secret


def callback_endpoint_update(
    *, endpoint: CallbackEndpoint, changes: dict[str, Any], actor: str = "the client", now: datetime | None = None
) -> CallbackEndpoint:
    """Change the URL, events, description or per_message flag; `enabled` goes through
    callback_endpoint_disable / _enable (disabling parks the pending callbacks)."""
    unknown = set(changes) - UPDATABLE_FIELDS
    if unknown:
        raise ValueError(f"not updatable: {', '.join(sorted(unknown))}")
    now = now or timezone.now()
    changes = dict(changes)
    enabled = changes.pop("enabled", None)
    if "url" in changes and changes["url"] != endpoint.url:
        taken = (
            CallbackEndpoint.objects.filter(client_id=endpoint.client_id, url=changes["url"])
            .exclude(pk=endpoint.pk)
            .values_list("pk", flat=True)
            .first()
        )
        if taken is not None:
            raise EndpointUrlTaken(taken)
    if changes:
        for name, value in changes.items():
            setattr(endpoint, name, value)
        try:
            with transaction.atomic():
                endpoint.save(update_fields=[*changes, "updated_at"])
        except IntegrityError:
            raise EndpointUrlTaken(0) from None
    if enabled is True:
        callback_endpoint_enable(endpoint_id=endpoint.pk)
    elif enabled is False:
        callback_endpoint_disable(endpoint_id=endpoint.pk, reason=f"disabled by {actor}", now=now)
    endpoint.refresh_from_db()
    return endpoint


def callback_endpoint_delete(*, endpoint: CallbackEndpoint) -> int:
    """Delete the endpoint and every callback to it: the pending ones are never sent, the sent
    ones leave the messages' detail, and their dead letters go too. Returns the pending count
    dropped. (Disable instead to keep them.)"""
    with transaction.atomic():
        pending = Callback.objects.filter(endpoint=endpoint, state=CallbackState.PENDING).count()
        endpoint_id = endpoint.pk
        endpoint.delete()
    logger.info("callback endpoint %s deleted; %d pending callbacks dropped", endpoint_id, pending)
    return pending


def callback_endpoint_rotate_secret(*, endpoint_id: int, now: datetime | None = None) -> CallbackEndpoint:
    """A new secret signs from now on; the ones before it keep signing beside it until
    CALLBACK_SECRET_OVERLAP_SECONDS from now (or their own earlier end), so receivers can switch
    without losing a callback. Expired ones are pruned."""
    now = now or timezone.now()
    ends = now + timedelta(seconds=messaging_setting("CALLBACK_SECRET_OVERLAP_SECONDS"))
    with transaction.atomic():
        endpoint = CallbackEndpoint.objects.select_for_update().get(pk=endpoint_id)
        kept = []
        for stored in secrets_active(endpoint.secrets, now=now):
            own_end = datetime.fromisoformat(stored["expires_at"]) if stored.get("expires_at") else None
            kept.append({**stored, "expires_at": min(ends, own_end or ends).isoformat()})
        fresh = {"secret": endpoint_secret_new(), "created_at": now.isoformat(), "expires_at": None}
        endpoint.secrets = [fresh, *kept][:MAX_SECRETS]
        endpoint.save(update_fields=["secrets", "updated_at"])
    logger.info("callback endpoint %s: secret rotated; %d older still sign until %s", endpoint_id, len(kept), ends)
    return endpoint


def callback_endpoint_disable(*, endpoint_id: int, reason: str, now: datetime) -> int | None:
    """Disable an enabled endpoint and park its pending callbacks as dead letters (replayable once it
    is enabled again): a disabled endpoint gets no new callbacks and keeps none waiting. Returns
    how many were parked, or None when it was not enabled (nothing done)."""
    with transaction.atomic():
        changed = CallbackEndpoint.objects.filter(pk=endpoint_id, enabled=True).update(
            enabled=False, disabled_at=now, disabled_reason=reason[:200], updated_at=now
        )
        if not changed:
            return None
        parked = callbacks_park_pending(endpoint_ids=[endpoint_id], now=now)
    logger.warning("callback endpoint %s disabled (%s); %d pending callbacks parked", endpoint_id, reason, parked)
    return parked


def callbacks_park_pending(*, endpoint_ids: list[int], now: datetime) -> int:
    """Park every pending callback of these (disabled) endpoints, in chunks."""
    parked = 0
    while True:
        ids = list(
            Callback.objects.filter(endpoint_id__in=endpoint_ids, state=CallbackState.PENDING)
            .order_by("pk")
            .values_list("pk", flat=True)[:PARK_CHUNK]
        )
        if not ids:
            return parked
        parked += callbacks_park(callback_ids=ids, reason=ENDPOINT_DISABLED, now=now)


def callback_endpoint_enable(*, endpoint_id: int) -> bool:
    """Enable a disabled endpoint with a clean slate (no failure run); its parked callbacks stay
    dead letters until replayed. Returns whether it was disabled."""
    changed = CallbackEndpoint.objects.filter(pk=endpoint_id, enabled=False).update(
        enabled=True, disabled_at=None, disabled_reason="", failing_since=None, updated_at=timezone.now()
    )
    if changed:
        logger.info("callback endpoint %s enabled", endpoint_id)
    return bool(changed)
