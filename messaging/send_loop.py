"""The process's send loop: a round's provider calls all run on it at once (asyncio in a daemon thread)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from providers.conf import providers_setting

T = TypeVar("T")


class _SendLoop:
    """An event loop in a daemon thread: a round's provider calls all run on it at once, over the
    adapters' pooled keep-alive connections; a blocking adapter runs in its thread pool."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(providers_setting("BULK_SEND_CONCURRENCY"), "bulk-send")
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.executor)
        threading.Thread(target=self.loop.run_forever, name="bulk-send-loop", daemon=True).start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


_loop: tuple[int, _SendLoop] | None = None


def send_loop() -> _SendLoop:
    """One per process, made after the fork (a prefork child must not inherit its parent's)."""
    global _loop
    if _loop is None or _loop[0] != os.getpid():
        _loop = (os.getpid(), _SendLoop())
    return _loop[1]
