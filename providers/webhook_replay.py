"""Replay protection for receipt webhooks signed over a timestamp and a one-time token only
(Mailgun's scheme): the body is not signed, so a captured signature could carry any event. A
signature too old or dated too far ahead is refused, and each token is taken once; the tokens seen
are kept in Redis so that every web process shares them."""

from __future__ import annotations

import hashlib
import logging
import math
import time

from providers.redis_state import STATE_ERRORS, shared_redis
from providers.types import WebhookReplayError, WebhookStateUnavailable

logger = logging.getLogger(__name__)

KEY_PREFIX = "conductor:webhook-token:"


def webhook_token_claim(*, provider: str, token: str, timestamp: str | float, max_age_seconds: float) -> str:
    """Take a rightly signed webhook's token once: returns the claim's key (for
    webhook_token_release), or raises WebhookReplayError (stale, ahead, seen before) or
    WebhookStateUnavailable (Redis did not answer: refuse rather than risk a replay)."""
    try:
        signed_at = float(timestamp)
    except (TypeError, ValueError):
        raise WebhookReplayError(f"signature timestamp {str(timestamp)[:32]!r} is not a number") from None
    age = time.time() - signed_at
    if not math.isfinite(age) or age > max_age_seconds:
        raise WebhookReplayError(f"signature is {age:.0f} s old; at most {max_age_seconds:.0f} s is accepted")
    if -age > max_age_seconds:
        raise WebhookReplayError(f"signature is dated {-age:.0f} s ahead; at most {max_age_seconds:.0f} s is accepted")
    if not isinstance(token, str) or not token:
        raise WebhookReplayError("signature without a token")
    # Hashed: a fixed-length key whatever the sender put in the token.
    key = f"{KEY_PREFIX}{provider}:{hashlib.sha256(token.encode('utf-8', 'surrogatepass')).hexdigest()}"
    # A token stays replayable while its timestamp is within the window: at most 2 × the window
    # after it is first seen (signed up to one window ahead of our clock).
    expiry = math.ceil(2 * max_age_seconds) + 1
    try:
        claimed = shared_redis().set(key, 1, nx=True, ex=expiry)
    except STATE_ERRORS as exc:
        raise WebhookStateUnavailable(f"cannot check the {provider} webhook token: {exc}") from exc
    if not claimed:
        raise WebhookReplayError("signature token already used: a replayed webhook")
    return key


def webhook_token_release(key: str) -> None:
    """Forget a claim whose webhook was not taken after all (it failed before it was stored), so
    that the provider's retry of it is not refused as a replay."""
    try:
        shared_redis().delete(key)
    except STATE_ERRORS as exc:
        logger.warning("could not release webhook token %s: %s", key, exc)
