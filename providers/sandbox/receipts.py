"""Receipt callbacks: timed, posted in order per message, retried per provider, counted.

`ReceiptScheduler` posts them, in the sandbox's callback process (providers.sandbox.poster) or,
when so configured, in the sandbox's own. One shared HTTP session with keep-alive connections
and a fixed pool of workers posts every callback; timers are the event loop's own. A message's
callbacks form a chain: the next one is armed only once the previous one is posted, given up or
waiting for a later retry, so they arrive in order while retries hours apart (Mailgun's,
Vonage's) run on their own, as the providers' do.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from array import array
from collections.abc import Callable, Container, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import quote_plus

import aiohttp
from aiohttp import web

from providers.sandbox.retries import CLIENT_ERROR, CONNECT, FINAL_ONLY, READ, SERVER_ERROR, RetryPolicy
from providers.sandbox.state import (
    CALLBACK_LOG_LIMIT,
    DELIVERY_RECEIPT,
    PROVIDERS,
    STATE_KEY,
    FaultSettings,
    StoredMessage,
    utcnow,
)

logger = logging.getLogger(__name__)

# Callbacks in flight at once: enough for a few thousand a second to a receiver answering in
# tens of milliseconds, few enough not to swamp one.
WORKERS = 256
# Intermediate callbacks (Twilio's `sent`, Vonage's `accepted`) come shortly after acceptance:
# spread evenly before the final one, but at most this far apart.
INTERMEDIATE_STEP_MAX_S = 1.0
# Log a given-up callback for the first one, then every this many (a dead receiver gives up
# thousands and the log would drown).
GIVE_UP_LOG_EVERY = 1000

# (body, headers) of one attempt; built per attempt so that nothing heavy waits in memory.
Encoded = tuple[bytes, dict[str, str]]
Encoder = Callable[[Any, str], Encoded]


@functools.lru_cache(maxsize=256)
def _quoted_name(name: str) -> str:
    return quote_plus(name)


def form_body(params: dict[str, str]) -> bytes:
    """`urlencode(params)`, several times faster: most values (ids, statuses, digits) need no quoting."""
    return "&".join(
        f"{_quoted_name(name)}={value if value.isascii() and value.isalnum() else quote_plus(value)}"
        for name, value in params.items()
    ).encode()


COUNTER_NAMES = ("scheduled", "posted_ok", "attempts", "failed_attempts", "given_up", "pending")


class Callback:
    """One callback to post (a status of one message); alive until it succeeds or is given up."""

    __slots__ = (
        "provider",
        "url",
        "message",
        "status",
        "encode",
        "policy",
        "due",
        "attempts",
        "first_attempt_at",
        "next",
        "handle",
        "epoch",
    )

    def __init__(
        self, provider: str, url: str, message: Any, status: str, encode: Encoder, policy: RetryPolicy, due: float
    ) -> None:
        self.provider, self.url, self.message, self.status = provider, url, message, status
        self.encode, self.policy, self.due = encode, policy, due
        self.attempts = 0
        self.first_attempt_at = 0.0
        self.next: Callback | None = None
        self.handle: asyncio.TimerHandle | None = None
        self.epoch = 0


class CallbackRecord:
    """What became of one callback, kept small: hundreds of thousands fit in the log."""

    __slots__ = ("provider", "provider_message_id", "status", "url", "status_code", "attempts", "ok", "error", "at")

    def __init__(self, callback: Callback, status_code: int | None, ok: bool, error: str | None) -> None:
        self.provider, self.status, self.url = callback.provider, callback.status, callback.url
        self.provider_message_id: str = callback.message.provider_message_id
        self.status_code, self.attempts, self.ok, self.error = status_code, callback.attempts, ok, error
        self.at = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "provider_message_id": self.provider_message_id,
            "status": self.status,
            "url": self.url,
            "status_code": self.status_code,
            "attempts": self.attempts,
            "ok": self.ok,
            "error": self.error,
            "sent_at": datetime.fromtimestamp(self.at, UTC).isoformat(),
        }


class Receipts(Protocol):
    """What the sandbox's routes ask of whatever posts its callbacks (in this process or a child)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def schedule(
        self,
        *,
        provider: str,
        url: str,
        message: StoredMessage,
        steps: Sequence[tuple[str, float]],
        policy: RetryPolicy,
    ) -> None:
        """Post one callback per (status, delay in seconds from now), in that order."""

    def faults_changed(self, faults: Mapping[str, FaultSettings]) -> None:
        """Take the current fault settings (callback_retry_scale applies to the next retry armed)."""

    async def reset(self) -> None:
        """Drop every callback not yet finished, the log and the counters; once it returns, no
        callback scheduled before it is posted."""

    async def report(self, *, records: bool) -> dict[str, Any]:
        """{"summary": ReceiptScheduler.summary(), "callbacks": the log as dicts, if `records`}."""
        ...


class ReceiptScheduler:
    """Posts the callbacks the provider emulations plan, and counts what became of them."""

    def __init__(self, encoders: Mapping[str, Encoder]) -> None:
        self._encoders = encoders
        self._scales = {name: FaultSettings().callback_retry_scale for name in PROVIDERS}
        self._session: aiohttp.ClientSession | None = None
        self._ready: asyncio.Queue[Callback] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._waiting: set[Callback] = set()  # armed timers, cancelled by reset
        self._epoch = 0
        self.counters = {name: dict.fromkeys(COUNTER_NAMES, 0) for name in PROVIDERS}
        # What became of each finished callback (CallbackRecord), newest last.
        self.records: collections.deque[CallbackRecord] = collections.deque(maxlen=CALLBACK_LOG_LIMIT)
        # How long each answered POST took, as a provider sees the receiver (4 bytes each).
        self._latencies_ms = array("f")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Keep-alive connections shared by every callback; as many as there are workers.
            connector=aiohttp.TCPConnector(limit=WORKERS),
            timeout=aiohttp.ClientTimeout(total=None),  # each attempt sets its provider's timeouts
        )
        self._start_workers()

    async def close(self) -> None:
        self._drop_pending()
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def pending_count(self) -> int:
        return sum(counts["pending"] for counts in self.counters.values())

    def summary(self) -> dict[str, Any]:
        """Counters per provider and in total (scheduled = posted_ok + given_up + pending), the
        answered POSTs' latency in ms (p50, p95, p99, max, count) since the last reset, and the
        pid of the process that posts them."""
        total = {name: sum(counts[name] for counts in self.counters.values()) for name in COUNTER_NAMES}
        return {
            "total": total,
            **{provider: dict(counts) for provider, counts in self.counters.items()},
            "latency_ms": _latency_summary(self._latencies_ms),
            "poster_pid": os.getpid(),
        }

    async def report(self, *, records: bool) -> dict[str, Any]:
        report: dict[str, Any] = {"summary": self.summary()}
        if records:
            report["callbacks"] = [record.as_dict() for record in self.records]
        return report

    def faults_changed(self, faults: Mapping[str, FaultSettings]) -> None:
        self._scales = {name: settings.callback_retry_scale for name, settings in faults.items()}

    async def reset(self) -> None:
        old_workers = self.cancel_all()
        # A worker cancelled mid-post stops once it next runs: wait for that, so that nothing of
        # before the reset is written after it.
        await asyncio.gather(*old_workers, return_exceptions=True)

    # --- planning ---------------------------------------------------------------------------------
    def schedule(
        self,
        *,
        provider: str,
        url: str,
        message: StoredMessage,
        steps: Sequence[tuple[str, float]],
        policy: RetryPolicy,
        since: float | None = None,
    ) -> None:
        """Post one callback per (status, delay in seconds from `since`, a time.monotonic() that
        defaults to now), in that order."""
        if not steps:
            return
        now = asyncio.get_running_loop().time() if since is None else since  # the loop's clock is monotonic
        encode = self._encoders[provider]
        chain = [Callback(provider, url, message, status, encode, policy, now + delay) for status, delay in steps]
        for earlier, later in zip(chain, chain[1:], strict=False):
            earlier.next = later
        counts = self.counters[provider]
        counts["scheduled"] += len(chain)
        counts["pending"] += len(chain)
        self._arm(chain[0], chain[0].due)

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Drop every callback not yet finished, the log and the counters; returns the workers it
        cancelled (they stop once they next run)."""
        self._drop_pending()
        # Workers may be mid-post: replace them so that no callback of before the reset lands after it.
        old_workers = self._workers
        for worker in old_workers:
            worker.cancel()
        self._start_workers()
        return old_workers

    def _drop_pending(self) -> int:
        pending = self.pending_count
        self._epoch += 1
        for callback in self._waiting:
            if callback.handle is not None:
                callback.handle.cancel()
        self._waiting.clear()
        self._ready = asyncio.Queue()
        self.counters = {name: dict.fromkeys(COUNTER_NAMES, 0) for name in PROVIDERS}
        self.records.clear()
        self._latencies_ms = array("f")
        return pending

    def _start_workers(self) -> None:
        loop = asyncio.get_running_loop()
        self._workers = [loop.create_task(self._work(self._ready)) for _ in range(WORKERS)]

    def _arm(self, callback: Callback, at: float) -> None:
        callback.epoch = self._epoch
        callback.handle = asyncio.get_running_loop().call_at(at, self._fire, callback)
        self._waiting.add(callback)

    def _fire(self, callback: Callback) -> None:
        self._waiting.discard(callback)
        callback.handle = None
        if callback.epoch == self._epoch:
            self._ready.put_nowait(callback)

    # --- posting ----------------------------------------------------------------------------------
    async def _work(self, ready: asyncio.Queue[Callback]) -> None:
        while True:
            callback = await ready.get()
            if callback.epoch != self._epoch:
                continue
            try:
                settled = await self._attempt(callback)
            except Exception as exc:  # a sandbox bug (an encoder's): show it, count it, keep working
                logger.exception("%s callback %s could not be posted", callback.provider, callback.status)
                self._give_up(callback, None, f"sandbox error: {exc!r}")
                settled = True
            if settled and callback.next is not None:
                # Posted, given up or waiting for a later retry: the message's next callback may follow.
                later, callback.next = callback.next, None
                self._arm(later, max(later.due, asyncio.get_running_loop().time()))

    async def _attempt(self, callback: Callback) -> bool:
        """One POST; False only when an immediate retry follows (the message's next callback waits)."""
        assert self._session is not None, "ReceiptScheduler.start() was not awaited"
        loop = asyncio.get_running_loop()
        policy = callback.policy
        callback.attempts += 1
        now = loop.time()
        if callback.attempts == 1:
            callback.first_attempt_at = now
        elapsed = now - callback.first_attempt_at
        body, headers = callback.encode(callback.message, callback.status)
        total = policy.remaining_s(elapsed) or policy.attempt_timeout_s
        read = policy.read_timeout_s
        timeout = aiohttp.ClientTimeout(
            total=total,
            sock_connect=policy.connect_timeout_s,
            # One timer less per callback when the total bounds the read anyway (Twilio's 15 s both).
            sock_read=None if read is None or (total is not None and read >= total) else read,
        )
        code: int | None = None
        kind: str | None = None
        error: str | None = None
        began = loop.time()
        try:
            async with self._session.post(
                callback.url, data=body, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                code = response.status
                await response.read()
            self._latencies_ms.append((loop.time() - began) * 1000)
        # Only network failures are expected here; anything else is a sandbox bug and should show.
        except aiohttp.ConnectionTimeoutError as exc:
            kind, error = CONNECT, f"{type(exc).__name__}: {exc}"
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            kind, error = READ, f"{type(exc).__name__}: {exc}"
        except aiohttp.ClientError as exc:  # refused, reset, disconnected before an answer
            kind, error = CONNECT, f"{type(exc).__name__}: {exc}"
        counts = self.counters[callback.provider]
        counts["attempts"] += 1
        if code is not None and 200 <= code < 300:
            counts["posted_ok"] += 1
            counts["pending"] -= 1
            self.records.append(CallbackRecord(callback, code, True, None))
        else:
            counts["failed_attempts"] += 1
            if code is not None:
                kind, error = (SERVER_ERROR if code >= 500 else CLIENT_ERROR), f"HTTP {code}"
            assert kind is not None
            spent = loop.time() - callback.first_attempt_at  # Twilio's `tt` counts this attempt too
            delay = policy.retry_delay(
                attempt=callback.attempts, kind=kind, code=code, status=callback.status, elapsed_s=spent
            )
            if delay is None:
                self._give_up(callback, code, error)
            else:
                scale = self._scales[callback.provider] if policy.scaled else 1.0
                self._arm(callback, loop.time() + delay * scale)
                return delay * scale > 0
        return True

    def _give_up(self, callback: Callback, code: int | None, error: str | None) -> None:
        counts = self.counters[callback.provider]
        counts["given_up"] += 1
        counts["pending"] -= 1
        self.records.append(CallbackRecord(callback, code, False, error))
        if counts["given_up"] % GIVE_UP_LOG_EVERY == 1:
            logger.warning(
                "%s callback %s for %s to %s given up after %d attempts: %s (%d %s callbacks given up so far)",
                callback.provider,
                callback.status,
                callback.message.provider_message_id,
                callback.url,
                callback.attempts,
                error,
                counts["given_up"],
                callback.provider,
            )


def spaced_steps(
    statuses: Sequence[str], *, delay_s: float, max_step_s: float = INTERMEDIATE_STEP_MAX_S
) -> list[tuple[str, float]]:
    """Delays for a sequence of statuses ending at `delay_s`: the earlier ones evenly before it,
    at most `max_step_s` apart (an intermediate status comes shortly after acceptance)."""
    if not statuses:
        return []
    step = min(delay_s / len(statuses), max_step_s)
    return [*((status, step * (i + 1)) for i, status in enumerate(statuses[:-1])), (statuses[-1], delay_s)]


def schedule_status_callbacks(
    app: web.Application,
    *,
    provider: str,
    message: StoredMessage,
    delivery: str,
    url: str,
    statuses: Sequence[str],
    final_only_status: str | None,
    intermediate: Container[str],
    policy: RetryPolicy,
) -> None:
    """Queue a message's status callbacks as Twilio and Vonage post them.

    realistic: `statuses` (the final one last) spaced before the final status's time, only the
    `intermediate` ones for a dropped message or a lost receipt, retried per `policy`;
    final_only: `final_only_status` alone at that time, retried per FINAL_ONLY."""
    faults = app[STATE_KEY].faults[provider]
    now = utcnow()
    if faults.callback_mode == "final_only":
        if delivery != DELIVERY_RECEIPT or message.final_at is None or final_only_status is None:
            return
        steps = [(final_only_status, max(0.0, (message.final_at - now).total_seconds()))]
        policy = FINAL_ONLY
    else:
        final_at = message.final_at or message.created_at + timedelta(milliseconds=faults.receipt_delay_ms)
        steps = spaced_steps(statuses, delay_s=max(0.0, (final_at - now).total_seconds()))
        if delivery != DELIVERY_RECEIPT:
            steps = [step for step in steps if step[0] in intermediate]
    app[RECEIPTS_KEY].schedule(provider=provider, url=url, message=message, steps=steps, policy=policy)


RECEIPTS_KEY = web.AppKey("sandbox_receipts", Receipts)


def _latency_summary(latencies: array) -> dict[str, float]:
    ordered = sorted(latencies)
    if not ordered:
        return {"count": 0}

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))], 2)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 2), "count": len(ordered)}
