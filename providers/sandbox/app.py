"""Assembles the sandbox provider's aiohttp app and runs it, in the foreground or in a thread."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from providers.sandbox import control, inbound, mailgun_api, twilio_api, vonage_api
from providers.sandbox.poster import CallbackProcess, callback_encoders
from providers.sandbox.receipts import RECEIPTS_KEY, ReceiptScheduler
from providers.sandbox.state import CONFIG_KEY, REQUEST_REMOTE, STATE_KEY, SandboxConfig, SandboxState

__all__ = ["SandboxConfig", "BackgroundSandbox", "build_app", "run_sandbox", "start_background"]

# Held "timeout" responses can sleep for 15 s; shutting down must not wait for them.
SHUTDOWN_TIMEOUT_S = 0.5


@web.middleware
async def remember_remote(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Each request is served in a task of its own: the log entries it writes name its sender."""
    REQUEST_REMOTE.set(request.remote)
    return await handler(request)


def build_app(config: SandboxConfig) -> web.Application:
    """The sandbox app: control API plus every provider emulation, sharing one state."""
    app = web.Application(middlewares=[remember_remote])
    state = SandboxState(config.seed, delivery_delay_ms=config.delivery_delay_ms)
    app[CONFIG_KEY] = config
    app[STATE_KEY] = state
    if config.callback_process:
        app[RECEIPTS_KEY] = CallbackProcess(config)
    else:
        app[RECEIPTS_KEY] = ReceiptScheduler(callback_encoders(config))

    async def receipts_lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Started with the app, stopped with it (the callback process too, when there is one);
        # a client session must be created on the loop that serves the app.
        await app[RECEIPTS_KEY].start()
        yield
        await app[RECEIPTS_KEY].close()

    app.cleanup_ctx.append(receipts_lifecycle)
    control.register(app)
    inbound.register(app)
    twilio_api.register(app)
    vonage_api.register(app)
    mailgun_api.register(app)
    return app


async def _start(config: SandboxConfig, host: str, port: int) -> tuple[web.AppRunner, int]:
    # access_log=None: the access logger costs noticeably at a few hundred requests per second.
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError:
        await runner.cleanup()  # closes the receipts session opened by setup()
        raise
    return runner, runner.addresses[0][1]


def run_sandbox(host: str, port: int, config: SandboxConfig) -> None:
    """Serve until SIGTERM or SIGINT; prints one line to stdout once it listens."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner, bound_port = await _start(config, host, port)
        try:
            # Supervisors (make run's, tests) wait for this line, so flush it at once.
            print(f"sandbox provider listening on http://{host}:{bound_port}", flush=True)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


async def _cancel_pending() -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class BackgroundSandbox:
    """A sandbox served by its own event loop in a daemon thread (for tests and benchmarks)."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sandbox-provider", daemon=True)
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(_start(config, host, port), self._loop)
        self._runner, self.port = future.result(timeout=10)
        self.url = f"http://{host}:{self.port}"

    @property
    def app(self) -> web.Application:
        return self._runner.app

    def stop(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        # Held ("timeout" fault) requests may still be pending: cancel them so the loop closes quietly.
        asyncio.run_coroutine_threadsafe(_cancel_pending(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> BackgroundSandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_background(config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> BackgroundSandbox:
    """Start a sandbox in a thread on a free port (port=0); call .stop() or use it as a context manager."""
    return BackgroundSandbox(config, host, port)
