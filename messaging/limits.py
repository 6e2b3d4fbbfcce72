"""Per-client limits: the priorities a client may send, its daily quota per channel, its API rate.

A quota is a Redis counter per client, channel and UTC day, taken from once per batch and channel
(one round trip for 1,000 messages, not one each) and given back for what was not stored. Redis
unreachable: the quota fails open (logged), as the circuit breakers do; the API keeps accepting.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from messaging.conf import messaging_setting
from messaging.metrics import QUOTA_REFUSED, QUOTA_WARNINGS
from messaging.models import ApiClient
from providers.redis_state import STATE_ERRORS, shared_redis

logger = logging.getLogger(__name__)

QUOTA_KEY = "conductor:quota:{client}:{channel}:{day}"
# A day's counter outlives its day a little (a give-back just after midnight finds it).
QUOTA_KEY_TTL_S = 2 * 24 * 3600

# Take up to ARGV[2] of the quota ARGV[1]; returns {granted, used after}. Atomic: concurrent
# batches of one client never take more than the quota between them.
_TAKE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local granted = math.max(0, math.min(tonumber(ARGV[2]), tonumber(ARGV[1]) - used))
if granted > 0 then
  used = redis.call('INCRBY', KEYS[1], granted)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
end
return {granted, used}
"""


class PriorityNotAllowed(Exception):
    """The client may not send this priority (HTTP 403, naming `priority`)."""

    def __init__(self, priority: str, allowed: list[str]):
        super().__init__(f"This client may not send {priority} messages; allowed: {', '.join(allowed) or 'none'}.")
        self.priority = priority


class QuotaExceeded(Exception):
    """The client's daily quota for the channel is spent (HTTP 429, naming `channel`)."""

    def __init__(self, channel: str, quota: int, retry_after_s: int):
        super().__init__(
            f"The daily quota of {quota} {channel} messages is reached; it renews at 00:00 UTC (in {retry_after_s} s)."
        )
        self.channel = channel
        self.retry_after_s = retry_after_s


def client_allowed_priorities(*, client: ApiClient) -> list[str]:
    return list(client.allowed_priorities or messaging_setting("ALLOWED_PRIORITIES"))


def client_api_rate(*, client: ApiClient) -> str | None:
    """The client's API rate as DRF writes it, or None for no limit."""
    rate = client.api_rate or messaging_setting("API_RATE")
    return None if rate in ("", "none") else rate


def client_daily_quota(*, client: ApiClient, channel: str) -> int | None:
    """Messages the client may have accepted on the channel per UTC day; None: no quota."""
    own = getattr(client, f"{channel}_daily_quota", None)
    return own if own is not None else messaging_setting("DAILY_QUOTA").get(channel)


@dataclass
class QuotaGrant:
    """What quota_take took: give back what was not stored (key None: nothing was counted)."""

    key: str | None
    granted: int


def quota_take(*, client: ApiClient, channel: str, count: int, now: datetime) -> QuotaGrant:
    """Take up to `count` messages of today's quota; the grant says how many fit."""
    quota = client_daily_quota(client=client, channel=channel)
    if quota is None or count <= 0:
        return QuotaGrant(None, count)
    key = QUOTA_KEY.format(client=client.pk, channel=channel, day=now.astimezone(UTC).strftime("%Y%m%d"))
    try:
        granted, used = shared_redis().register_script(_TAKE)(keys=[key], args=[quota, count, QUOTA_KEY_TTL_S])
    except STATE_ERRORS:
        logger.warning("daily quota of client %s not checked: Redis unreachable (failing open)", client.name)
        return QuotaGrant(None, count)
    granted, used = int(granted), int(used)
    threshold = math.ceil(quota * messaging_setting("QUOTA_WARNING_RATIO"))
    if used - granted < threshold <= used:  # this take crossed it: once a day
        QUOTA_WARNINGS.labels(client=client.name, channel=channel).inc()
        logger.warning(
            "client %s has used %d of its daily %s quota of %d",
            client.name,
            used,
            channel,
            quota,
            extra={"event": "quota_warning", "client": client.name, "channel": channel, "used": used, "quota": quota},
        )
    if granted < count:
        QUOTA_REFUSED.labels(client=client.name, channel=channel).inc(count - granted)
        logger.warning(
            "client %s: %d %s message(s) refused, daily quota of %d reached",
            client.name,
            count - granted,
            channel,
            quota,
            extra={"event": "quota_refused", "client": client.name, "channel": channel, "quota": quota},
        )
    return QuotaGrant(key, granted)


def quota_give_back(*, grant: QuotaGrant, count: int) -> None:
    """Return `count` of a grant (items replayed, refused for another reason, or rolled back)."""
    if grant.key is None or count <= 0:
        return
    try:
        shared_redis().decrby(grant.key, count)
    except STATE_ERRORS:
        logger.warning("could not give back %d of a daily quota (Redis unreachable)", count)


def quota_retry_after(now: datetime) -> int:
    """Seconds until the quotas renew (00:00 UTC)."""
    today = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, math.ceil((today + timedelta(days=1) - now).total_seconds()))
