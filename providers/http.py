"""HTTP facts every adapter needs: whether a request can have reached the provider, Retry-After,
and connections that, once given up on, cannot deliver a request later."""

from __future__ import annotations

import socket
import struct
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection
from urllib3.exceptions import MaxRetryError, NameResolutionError, NewConnectionError

# Closing a socket normally leaves what it had not yet sent with the kernel, which goes on
# retransmitting it for a minute or two (an orphaned connection). A send we gave up on (a timeout:
# the network between us and the provider went silent) could then still reach the provider once
# the network came back, after another worker had looked the message up, not found it and sent it:
# a second copy (seen with a worker host cut off the network: tests/integration/test_multi_host.py,
# docs/multi-host.md). SO_LINGER with a zero timeout makes close() drop the unsent bytes and reset
# the connection instead, so "given up" means "can no longer arrive" (but for packets already on
# the wire, which the look-up's wait outlasts).
ABORT_ON_CLOSE = (socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def aborting_socket(addr_info: tuple[Any, ...]) -> socket.socket:
    """aiohttp's TCPConnector(socket_factory=...): its sockets with ABORT_ON_CLOSE."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(*ABORT_ON_CLOSE)
    return sock


class AbortingHTTPAdapter(HTTPAdapter):
    """requests' adapter whose connections (direct or through a proxy) close with ABORT_ON_CLOSE."""

    socket_options = [*HTTPConnection.default_socket_options, ABORT_ON_CLOSE]

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("socket_options", self.socket_options)
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("socket_options", self.socket_options)
        return super().proxy_manager_for(proxy, **proxy_kwargs)


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
