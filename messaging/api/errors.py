"""API error handling: DRF's shapes, plus 503 when the database cannot be reached."""

from __future__ import annotations

import logging

from django.db import DatabaseError, InterfaceError, OperationalError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

logger = logging.getLogger(__name__)


def exception_handler(exc, context):
    if isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DatabaseError) and "connection" in str(exc).lower()
    ):
        logger.error("database unavailable: %s", exc)
        return Response(
            {"detail": "The database is unavailable; nothing was stored. Retry with the same idempotency key."},
            status=503,
            headers={"Retry-After": "5"},
        )
    return drf_exception_handler(exc, context)
