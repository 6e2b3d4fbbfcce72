"""Delayed receipt callbacks: one asyncio task per pending receipt, one shared HTTP session."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from providers.sandbox.state import SandboxState, utcnow

logger = logging.getLogger(__name__)

# Pauses between attempts: a receiver that is briefly down (a restarting web process) still gets
# its receipt, while a dead one is given up on within two seconds.
RETRY_BACKOFF_S = (0.2, 0.5, 1.0)
# Per-attempt limit, so a hung receiver cannot pin a task forever.
ATTEMPT_TIMEOUT_S = 5.0


class ReceiptScheduler:
    """Sends provider receipts after a delay, retries a few times, and logs the result in state."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._session: aiohttp.ClientSession | None = None
        self._pending: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT_S),
            # Hundreds of receipts can fall due together; let them share keep-alive connections.
            connector=aiohttp.TCPConnector(limit=200),
        )

    async def close(self) -> None:
        self.cancel_all()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def schedule(
        self,
        *,
        delay_s: float,
        url: str,
        provider: str,
        provider_message_id: str,
        status: str,
        data: dict[str, str] | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """POST `data` (form) or `json` to `url` after `delay_s`; the caller builds the wire format."""
        task = asyncio.get_running_loop().create_task(
            self._deliver(
                delay_s=delay_s,
                url=url,
                data=data,
                json=json,
                headers=headers or {},
                record={"provider": provider, "provider_message_id": provider_message_id, "status": status},
            )
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def cancel_all(self) -> int:
        """Cancel every receipt not yet delivered (used by reset); returns how many were pending."""
        count = len(self._pending)
        for task in list(self._pending):
            task.cancel()
        return count

    async def _deliver(
        self,
        *,
        delay_s: float,
        url: str,
        data: dict[str, str] | None,
        json: Any,
        headers: dict[str, str],
        record: dict[str, Any],
    ) -> None:
        await asyncio.sleep(delay_s)
        assert self._session is not None, "ReceiptScheduler.start() was not awaited"
        status_code: int | None = None
        error: str | None = None
        attempts = 0
        for backoff in (*RETRY_BACKOFF_S, None):
            attempts += 1
            try:
                async with self._session.post(url, data=data, json=json, headers=headers) as response:
                    await response.read()
                    status_code = response.status
                if 200 <= status_code < 300:
                    error = None
                    break
                error = f"HTTP {status_code}"
            # Only network failures are expected here; anything else is a sandbox bug and should show.
            except (TimeoutError, aiohttp.ClientError) as exc:
                status_code, error = None, f"{type(exc).__name__}: {exc}"
            if backoff is not None:
                await asyncio.sleep(backoff)
        if error:
            logger.warning(
                "receipt for %s to %s given up after %d attempts: %s",
                record["provider_message_id"],
                url,
                attempts,
                error,
            )
        self._state.callbacks.append(
            {
                **record,
                "url": url,
                "status_code": status_code,
                "attempts": attempts,
                "ok": error is None,
                "error": error,
                "sent_at": utcnow().isoformat(),
            }
        )


RECEIPTS_KEY = web.AppKey("sandbox_receipts", ReceiptScheduler)
