"""API error handling: DRF's shapes, plus 503 when the database cannot be reached and 413 with its limit."""

from __future__ import annotations

import logging

from django.db import DatabaseError, DataError, InterfaceError, OperationalError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from messaging.api.parsers import RequestTooLarge

logger = logging.getLogger(__name__)


def database_unavailable(exc: BaseException) -> bool:
    """Whether a database error means the database could not be reached (retry later: 503), not
    that it refused what it was given (a bug: never a 503, which a client retries for ever)."""
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DatabaseError) and not isinstance(exc, DataError) and "connection" in str(exc).lower()
    )


def exception_handler(exc, context):
    if isinstance(exc, RequestTooLarge):
        return Response({"detail": str(exc.detail), "max_bytes": exc.limit}, status=exc.status_code)
    if database_unavailable(exc):
        logger.error("database unavailable: %s", exc)
        return Response(
            {"detail": "The database is unavailable; nothing was stored. Retry with the same idempotency key."},
            status=503,
            headers={"Retry-After": "5"},
        )
    return drf_exception_handler(exc, context)
