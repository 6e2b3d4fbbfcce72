"""How every adapter sorts a failed call into the three provider errors: by its HTTP answer, or by
how far the request got when no answer came."""

from __future__ import annotations

import asyncio

import aiohttp
import requests

from providers.http import never_connected, retry_after_seconds
from providers.types import (
    AmbiguousProviderError,
    ErrorType,
    PermanentProviderError,
    ProviderError,
    TransientProviderError,
)

# Failures of the call itself (no answer, or none we could read), in every client adapters use.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.RequestException,
    aiohttp.ClientError,
    asyncio.TimeoutError,
)


def classify_status(
    status: int,
    message: str,
    *,
    code: str = "",
    retry_after: str | None = None,
    refusal_type: str = ErrorType.REJECTED,
) -> ProviderError:
    """An HTTP error answer as one of the three errors.

    `code` is the provider's own error code (the status when it has none), `retry_after` the
    Retry-After header and `refusal_type` the ErrorType of a permanent refusal, as the adapter's
    error-code map reads the answer.
    """
    code = code or str(status)
    if status == 429:
        return TransientProviderError(
            message, error_type=ErrorType.RATE_LIMITED, code=code, retry_after=retry_after_seconds(retry_after)
        )
    if status >= 500:
        return TransientProviderError(message, error_type=ErrorType.PROVIDER_5XX, code=code)
    if status in (401, 403):
        # Our credentials, not the message: retry (and dead-letter for replay once fixed).
        return TransientProviderError(message, error_type=ErrorType.PROVIDER_AUTH, code=code)
    if 200 <= status < 300:
        # A success we could not read: the provider may well have taken it.
        return AmbiguousProviderError(message, error_type=ErrorType.UNKNOWN, code=code)
    return PermanentProviderError(message, error_type=refusal_type, code=code)


def classify_transport(exc: BaseException) -> ProviderError:
    """No answer: transient if the request cannot have reached the provider, else ambiguous."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return TransientProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
    if isinstance(exc, requests.exceptions.ReadTimeout):
        # The request left: the provider may have accepted it.
        return AmbiguousProviderError("no response within the timeout", error_type=ErrorType.PROVIDER_TIMEOUT)
    if isinstance(exc, requests.exceptions.ConnectionError):
        if never_connected(exc):
            return TransientProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
        return AmbiguousProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
    # aiohttp's: ConnectionTimeoutError is also a ServerTimeoutError, so it is sorted first.
    if isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)):
        return TransientProviderError(str(exc) or type(exc).__name__, error_type=ErrorType.CONNECTION_ERROR)
    if isinstance(exc, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return AmbiguousProviderError("no response within the timeout", error_type=ErrorType.PROVIDER_TIMEOUT)
    if isinstance(exc, aiohttp.ClientError):
        return AmbiguousProviderError(str(exc) or type(exc).__name__, error_type=ErrorType.CONNECTION_ERROR)
    if never_connected(exc):  # a bare socket error, e.g. a refused connection
        return TransientProviderError(str(exc), error_type=ErrorType.CONNECTION_ERROR)
    # Anything else (an answer we could not read): it may have been accepted.
    return AmbiguousProviderError(str(exc), error_type=ErrorType.UNKNOWN)
