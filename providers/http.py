"""HTTP facts every adapter needs: whether a request can have reached the provider, Retry-After."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import requests
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError

_NOT_CONNECTED = (ConnectionRefusedError, NewConnectionError, NameResolutionError)


def never_connected(exc: BaseException) -> bool:
    """True when the TCP connection was never made, so the request cannot have been received.

    Such a failure is safe to retry anywhere; any other connection error after the request
    started may have reached the provider and is ambiguous.
    """
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    cause: BaseException | None = exc
    for _ in range(10):  # walk the exception chain requests/urllib3 (and SDKs) build
        if cause is None:
            return False
        if isinstance(cause, _NOT_CONNECTED):
            return True
        if isinstance(cause, MaxRetryError) and isinstance(cause.reason, _NOT_CONNECTED):
            return True
        nested = cause.args[0] if cause.args and isinstance(cause.args[0], BaseException) else None
        cause = cause.__cause__ or cause.__context__ or nested
    return False


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header as seconds (it may be a number or an HTTP date); None if absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(UTC)).total_seconds())
    except (TypeError, ValueError):
        return None
