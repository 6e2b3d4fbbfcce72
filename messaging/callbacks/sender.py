"""The process's callback sender: HTTP requests on an asyncio loop in a daemon thread.

One HTTP client per process (messaging.callbacks.http: ours, for its CPU cost), its keep-alive
connections pooled across deliveries (a new TCP connection per callback would cost each receiver
a handshake and us most of our CPU). The
deliverer (messaging.callbacks.delivery) hands it batches from its own thread, where the
database work happens, and gets each answer back through a callable, called on the loop thread.
Requests are signed on the loop at send time, so webhook-timestamp is when the request left.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from messaging.callbacks.destinations import address_allowed, private_networks_allowed
from messaging.callbacks.http import HttpClient, HttpError
from messaging.callbacks.retries import BLOCKED, CONNECTION, TIMEOUT
from messaging.callbacks.signing import USER_AGENT, callback_headers

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallbackRequest:
    key: int  # the Callback's id
    url: str
    webhook_id: str
    body: bytes
    secrets: list[dict[str, Any]]


@dataclass(frozen=True)
class CallbackResponse:
    key: int
    status: int | None  # None: no answer (error says why)
    error: str  # "", TIMEOUT, CONNECTION or BLOCKED
    detail: str  # the transport error's text, for the attempt log
    retry_after: str | None
    started_at: datetime
    latency_s: float


class CallbackSender:
    """An event loop in a daemon thread with one pooled HTTP client (at most `concurrency`
    connections open at once: the deliverer keeps requests in flight below that).
    `ssl_context` replaces the default (verifying) one: for tests with their own CA. With
    `public_only`, connections go only to public addresses (messaging.callbacks.destinations)."""

    def __init__(
        self, concurrency: int, *, ssl_context: ssl.SSLContext | None = None, public_only: bool = False
    ) -> None:
        self.concurrency = concurrency
        self.public_only = public_only
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        threading.Thread(target=self.loop.run_forever, name="callback-sender", daemon=True).start()
        self.client = asyncio.run_coroutine_threadsafe(self._open(ssl_context), self.loop).result()
        atexit.register(self.close)

    def close(self) -> None:
        """Close the pooled connections."""
        if self.loop.is_running() and not self.client.closed:
            try:
                asyncio.run_coroutine_threadsafe(self.client.close(), self.loop).result(timeout=1)
            except Exception:  # exiting anyway
                pass

    async def _open(self, ssl_context: ssl.SSLContext | None) -> HttpClient:
        return HttpClient(
            self.concurrency,
            user_agent=USER_AGENT,
            ssl_context=ssl_context,
            address_allowed=address_allowed if self.public_only else None,
        )

    def submit(
        self, requests: list[CallbackRequest], *, timeout_s: float, answer: Callable[[CallbackResponse], None]
    ) -> None:
        """Start these requests (returns at once); `answer` gets each one's response, on the loop."""
        if requests:
            self.loop.call_soon_threadsafe(self._start, requests, timeout_s, answer)

    def _start(
        self, requests: list[CallbackRequest], timeout_s: float, answer: Callable[[CallbackResponse], None]
    ) -> None:
        for request in requests:
            task = self.loop.create_task(self._post(request, timeout_s, answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(
        self, request: CallbackRequest, timeout_s: float, answer: Callable[[CallbackResponse], None]
    ) -> None:
        started_at = datetime.now(UTC)
        began = time.perf_counter()
        status, error, detail, retry_after = None, "", "", None
        try:
            headers = callback_headers(
                webhook_id=request.webhook_id, body=request.body, secrets=request.secrets, now=started_at
            )
            response = await self.client.post(request.url, request.body, headers, timeout_s=timeout_s)
            status, retry_after = response.status, response.headers.get("retry-after")
        except HttpError as exc:
            # Refused, reset, DNS, TLS, a malformed answer or URL, or no answer in time.
            error, detail = (TIMEOUT if exc.timeout else BLOCKED if exc.blocked else CONNECTION), str(exc)
        except ValueError as exc:  # no signing secret
            error, detail = CONNECTION, f"{type(exc).__name__}: {exc}"[:300]
        except BaseException as exc:
            # Whatever else ends the request, the deliverer must hear of it: a request it never
            # hears back from holds its endpoint's slot (and the callback's lease) for good.
            error, detail = CONNECTION, f"{type(exc).__name__}: {exc}"[:300]
            logger.warning("callback %s: the request ended in %s", request.key, detail, exc_info=True)
            if not isinstance(exc, Exception):  # a cancel (the loop closing): told, then let through
                answer(_response(request, None, error, detail, None, started_at, began))
                raise
        answer(_response(request, status, error, detail, retry_after, started_at, began))


def _response(
    request: CallbackRequest,
    status: int | None,
    error: str,
    detail: str,
    retry_after: str | None,
    started_at: datetime,
    began: float,
) -> CallbackResponse:
    return CallbackResponse(
        key=request.key,
        status=status,
        error=error,
        detail=detail,
        retry_after=retry_after,
        started_at=started_at,
        latency_s=time.perf_counter() - began,
    )


_sender: tuple[int, CallbackSender] | None = None
_sender_lock = threading.Lock()


def callback_sender(concurrency: int) -> CallbackSender:
    """One per process, made after the fork (a prefork child must not inherit its parent's loop),
    and again if the concurrency or private-network setting changed."""
    global _sender
    public_only = not private_networks_allowed()
    with _sender_lock:
        if (
            _sender is None
            or _sender[0] != os.getpid()
            or _sender[1].concurrency != concurrency
            or _sender[1].public_only != public_only
        ):
            _sender = (os.getpid(), CallbackSender(concurrency, public_only=public_only))
        return _sender[1]
