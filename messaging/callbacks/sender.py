"""The process's callback sender: HTTP requests on an asyncio loop in a daemon thread.

One aiohttp session per process, its keep-alive connections pooled across deliveries (a new TCP
connection per callback would cost each receiver a handshake and us most of our CPU). The
deliverer (messaging.callbacks.delivery) hands it batches from its own thread, where the
database work happens, and gets each answer back through a callable, called on the loop thread.
Requests are signed on the loop at send time, so webhook-timestamp is when the request left.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from messaging.callbacks.retries import CONNECTION, TIMEOUT
from messaging.callbacks.signing import callback_headers

# A receiver's answer is read this far (we only need its status); a longer one closes the
# connection instead of being read on.
MAX_ANSWER_BYTES = 64 * 1024


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
    error: str  # "", TIMEOUT or CONNECTION
    detail: str  # the transport error's text, for the attempt log
    retry_after: str | None
    started_at: datetime
    latency_s: float


class CallbackSender:
    """An event loop in a daemon thread with one pooled aiohttp session (at most `concurrency`
    connections open at once: the deliverer keeps requests in flight below that)."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        threading.Thread(target=self.loop.run_forever, name="callback-sender", daemon=True).start()
        self.session = asyncio.run_coroutine_threadsafe(self._open(), self.loop).result()
        atexit.register(self.close)

    def close(self) -> None:
        """Close the pooled connections (at exit: a session left open is reported as a leak)."""
        if self.loop.is_running() and not self.session.closed:
            try:
                asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(timeout=1)
            except Exception:  # exiting anyway
                pass

    async def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0, keepalive_timeout=30)
        # No cookies between requests (they go to many clients), no proxy from the environment.
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)

    def submit(
        self, requests: list[CallbackRequest], *, timeout_s: float, answer: Callable[[CallbackResponse], None]
    ) -> None:
        """Start these requests (returns at once); `answer` gets each one's response, on the loop."""
        if requests:
            self.loop.call_soon_threadsafe(self._start, requests, aiohttp.ClientTimeout(total=timeout_s), answer)

    def _start(
        self,
        requests: list[CallbackRequest],
        timeout: aiohttp.ClientTimeout,
        answer: Callable[[CallbackResponse], None],
    ) -> None:
        for request in requests:
            task = self.loop.create_task(self._post(request, timeout, answer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(
        self, request: CallbackRequest, timeout: aiohttp.ClientTimeout, answer: Callable[[CallbackResponse], None]
    ) -> None:
        started_at = datetime.now(UTC)
        began = time.perf_counter()
        status, error, detail, retry_after = None, "", "", None
        try:
            headers = callback_headers(
                webhook_id=request.webhook_id, body=request.body, secrets=request.secrets, now=started_at
            )
            async with self.session.post(
                request.url, data=request.body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                await _read_answer(response)
                status, retry_after = response.status, response.headers.get("Retry-After")
        except TimeoutError:
            error, detail = TIMEOUT, f"no answer within {timeout.total:g} s"
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            # Refused, reset, DNS, TLS, a malformed answer or URL: the request did not get an answer.
            error, detail = CONNECTION, f"{type(exc).__name__}: {exc}"[:300]
        answer(
            CallbackResponse(
                key=request.key,
                status=status,
                error=error,
                detail=detail,
                retry_after=retry_after,
                started_at=started_at,
                latency_s=time.perf_counter() - began,
            )
        )


async def _read_answer(response: aiohttp.ClientResponse) -> None:
    """Read the answer's body (so the connection can be reused), up to MAX_ANSWER_BYTES."""
    remaining = MAX_ANSWER_BYTES
    while remaining > 0:
        chunk = await response.content.read(min(remaining, 16 * 1024))
        if not chunk:
            return
        remaining -= len(chunk)
    response.close()


_sender: tuple[int, CallbackSender] | None = None
_sender_lock = threading.Lock()


def callback_sender(concurrency: int) -> CallbackSender:
    """One per process, made after the fork (a prefork child must not inherit its parent's loop),
    and again if the concurrency setting changed."""
    global _sender
    with _sender_lock:
        if _sender is None or _sender[0] != os.getpid() or _sender[1].concurrency != concurrency:
            _sender = (os.getpid(), CallbackSender(concurrency))
        return _sender[1]
