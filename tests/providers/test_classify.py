"""The shared failure rules of every adapter (providers.classify)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace

import aiohttp
import pytest
import requests
from urllib3.exceptions import MaxRetryError, NewConnectionError

from providers.classify import classify_status, classify_transport
from providers.types import (
    AmbiguousProviderError,
    ErrorType,
    PermanentProviderError,
    TransientProviderError,
)


# --- classify_status --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "kind", "error_type"),
    [
        (429, TransientProviderError, ErrorType.RATE_LIMITED),
        (500, TransientProviderError, ErrorType.PROVIDER_5XX),
        (503, TransientProviderError, ErrorType.PROVIDER_5XX),
        (401, TransientProviderError, ErrorType.PROVIDER_AUTH),
        (403, TransientProviderError, ErrorType.PROVIDER_AUTH),
        (200, AmbiguousProviderError, ErrorType.UNKNOWN),
        (400, PermanentProviderError, ErrorType.REJECTED),
        (404, PermanentProviderError, ErrorType.REJECTED),
    ],
)
def test_each_status_is_one_kind_with_the_status_as_code(status, kind, error_type):
    error = classify_status(status, "the answer")
    assert type(error) is kind and error.error_type == error_type and error.code == str(status)
    assert str(error) == "the answer" and error.retry_after is None


def test_the_providers_own_code_is_kept_over_the_status():
    assert classify_status(503, "busy", code="20500").code == "20500"
    assert classify_status(400, "bad", code="21211").code == "21211"


def test_a_refusal_takes_the_type_the_adapters_code_map_gave_it():
    error = classify_status(400, "bad number", code="21211", refusal_type=ErrorType.INVALID_RECIPIENT)
    assert isinstance(error, PermanentProviderError) and error.error_type == ErrorType.INVALID_RECIPIENT


@pytest.mark.parametrize("status", [429, 500, 401, 403])
def test_the_refusal_type_never_makes_a_retryable_answer_permanent(status):
    error = classify_status(status, "x", refusal_type=ErrorType.INVALID_RECIPIENT)
    assert isinstance(error, TransientProviderError)


def test_a_429_carries_retry_after_in_seconds_or_as_an_http_date():
    assert classify_status(429, "slow down", retry_after="2.5").retry_after == 2.5
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < classify_status(429, "slow down", retry_after=later).retry_after <= 30
    assert classify_status(429, "slow down", retry_after="soon").retry_after is None
    assert classify_status(429, "slow down").retry_after is None


# --- classify_transport -----------------------------------------------------------------------------
def refused() -> requests.exceptions.ConnectionError:
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(None, "/", reason))


def connector_error() -> aiohttp.ClientConnectorError:
    key = SimpleNamespace(host="127.0.0.1", port=1, ssl=False)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "Connection refused"))


@pytest.mark.parametrize(
    ("exc", "kind", "error_type"),
    [
        # requests: never connected, so nothing can have been received
        (requests.exceptions.ConnectTimeout("connect timed out"), TransientProviderError, ErrorType.CONNECTION_ERROR),
        (refused(), TransientProviderError, ErrorType.CONNECTION_ERROR),
        # requests: the request may have left
        (requests.exceptions.ReadTimeout("read timed out"), AmbiguousProviderError, ErrorType.PROVIDER_TIMEOUT),
        (
            requests.exceptions.ConnectionError("Connection aborted: RemoteDisconnected"),
            AmbiguousProviderError,
            ErrorType.CONNECTION_ERROR,
        ),
        (requests.exceptions.ChunkedEncodingError("cut short"), AmbiguousProviderError, ErrorType.UNKNOWN),
        # aiohttp (the Twilio bulk path)
        (connector_error(), TransientProviderError, ErrorType.CONNECTION_ERROR),
        (aiohttp.ConnectionTimeoutError(), TransientProviderError, ErrorType.CONNECTION_ERROR),
        (aiohttp.ServerTimeoutError(), AmbiguousProviderError, ErrorType.PROVIDER_TIMEOUT),
        (TimeoutError(), AmbiguousProviderError, ErrorType.PROVIDER_TIMEOUT),
        (aiohttp.ServerDisconnectedError(), AmbiguousProviderError, ErrorType.CONNECTION_ERROR),
        (aiohttp.ClientPayloadError("cut short"), AmbiguousProviderError, ErrorType.CONNECTION_ERROR),
        # a bare socket error, and an answer nobody could read
        (ConnectionRefusedError(111, "Connection refused"), TransientProviderError, ErrorType.CONNECTION_ERROR),
        (ValueError("not JSON"), AmbiguousProviderError, ErrorType.UNKNOWN),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_each_transport_failure_is_transient_only_if_nothing_can_have_been_sent(exc, kind, error_type):
    error = classify_transport(exc)
    assert type(error) is kind and error.error_type == error_type
    assert str(error)  # aiohttp's errors can have no text: the kind's name stands in
