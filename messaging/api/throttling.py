"""The API's request rate per client: DRF's cache-based throttle, keyed by the authenticated
client, at the client's own rate (messaging.limits.client_api_rate).

Its counts live in the "throttle" cache, in the shared state Redis (conductor_project.settings), so
every gunicorn process and host shares one count per client; a per-process cache would let each
process allow the whole rate. Redis unreachable: the request is let through (logged), as the quota does.
"""

from __future__ import annotations

import logging

from django.core.cache import caches
from rest_framework.throttling import SimpleRateThrottle

from messaging.limits import client_api_rate
from messaging.metrics import API_THROTTLED
from messaging.models import ApiClient
from providers.redis_state import STATE_ERRORS

logger = logging.getLogger(__name__)

THROTTLE_CACHE = "throttle"


class ClientRateThrottle(SimpleRateThrottle):
    """Answers 429 with Retry-After (DRF's Throttled) once a client exceeds its rate."""

    scope = "client"

    def __init__(self) -> None:
        # The rate is the client's, known only once the request is authenticated (allow_request).
        self.cache = caches[THROTTLE_CACHE]

    def allow_request(self, request, view) -> bool:
        client = request.auth
        if not isinstance(client, ApiClient):
            return True  # unauthenticated: the permission check answers 401/403
        self.rate = client_api_rate(client=client)
        if self.rate is None:
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        try:
            allowed = super().allow_request(request, view)
        except STATE_ERRORS:  # the cache lets redis-py's errors through
            logger.warning("request rate of client %s not checked: throttle cache unreachable", client.name)
            return True
        if not allowed:
            API_THROTTLED.labels(client=client.name).inc()
        return allowed

    def get_cache_key(self, request, view) -> str:
        return self.cache_format % {"scope": self.scope, "ident": request.auth.pk}
