"""The receipt intake server: provider receipt webhooks taken on an event loop, outside Django's
request cycle (`manage.py receipt_intake`, at CONDUCTOR_RECEIPTS_URL).

A campaign's receipts come in thousands a second and the provider gives up on a receiver that is
slow. Under gunicorn each one costs a thread, Django's request object and a wait on the shared
write; here aiohttp's C parser reads it, the provider adapter verifies and parses it on the loop
(the same webhook_events the Django view runs, on a Django request made from the bytes), and the
coroutine waits for the process's group commit while the loop takes the next ones: every receipt
that came during a write is one row more in the next INSERT. Answers are those of the Django view
(204 stored; 400, 403, 404, 503 refused, nothing stored; 500 when the write failed, so that the
provider retries). anymail's tracking webhooks (Mailgun's account-level URL) run their Django view
in a thread, and so do inbound message webhooks (/webhooks/<provider>/inbound/), so that every
webhook URL works at this base URL too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import logging
import os
import signal
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

from aiohttp import web
from django.conf import settings
from django.core.handlers.wsgi import WSGIRequest
from django.core.wsgi import get_wsgi_application
from django.db import connections

from messaging.receipts import receipts_store_async
from messaging.webhooks import WebhookRefused, webhook_events

logger = logging.getLogger(__name__)

# Threads for anymail's tracking views (a Django request each, waiting on the group commit).
DJANGO_VIEW_THREADS = 16
# Held-open requests may wait on the write: shutting down gives them this long.
SHUTDOWN_TIMEOUT_S = 5.0
_NO_HTTP_PREFIX = {"CONTENT_TYPE", "CONTENT_LENGTH"}


def wsgi_environ(request: web.Request, body: bytes) -> dict[str, Any]:
    """The WSGI environ of an aiohttp request whose body has been read (what gunicorn would build)."""
    path, _, query = request.raw_path.partition("?")
    host, _, port = (request.host or "").partition(":")
    environ: dict[str, Any] = {
        "REQUEST_METHOD": request.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote(path, encoding="latin-1"),
        "QUERY_STRING": query,
        "CONTENT_TYPE": request.headers.get("Content-Type", ""),
        "CONTENT_LENGTH": str(len(body)),
        "SERVER_NAME": host or "localhost",
        "SERVER_PORT": port or ("443" if request.secure else "80"),
        "SERVER_PROTOCOL": f"HTTP/{request.version.major}.{request.version.minor}",
        "REMOTE_ADDR": request.remote or "",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": request.scheme,
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }
    for name, value in request.headers.items():
        key = name.upper().replace("-", "_")
        if key not in _NO_HTTP_PREFIX:
            key = f"HTTP_{key}"
            environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


async def provider_receipts(request: web.Request) -> web.Response:
    """POST (or GET: Vonage may send receipts so) /webhooks/<provider>/."""
    provider_name = request.match_info["provider"]
    body = await request.read()
    try:
        events = webhook_events(WSGIRequest(wsgi_environ(request, body)), provider_name)
    except WebhookRefused as refused:
        return web.json_response({"detail": refused.detail}, status=refused.status)
    try:
        await receipts_store_async(events=events)
    except Exception:  # the database down: a 5xx, and the provider retries
        logger.exception("could not store %d %s receipts", len(events), provider_name)
        return web.json_response({"detail": "internal error; retry later"}, status=500)
    return web.Response(status=204)


async def django_view(request: web.Request) -> web.Response:
    """anymail's tracking webhooks: Django's whole handler (middleware, URLconf, the view) in a thread."""
    body = await request.read()
    environ = wsgi_environ(request, body)
    loop = asyncio.get_running_loop()
    status, headers, content = await loop.run_in_executor(
        request.app[EXECUTOR_KEY], _call_django, request.app[DJANGO_KEY], environ
    )
    return web.Response(status=status, headers=headers, body=content)


def _call_django(application: Any, environ: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started["status"], started["headers"] = int(status.split(" ", 1)[0]), headers

    chunks: Iterable[bytes] = application(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # sends request_finished: the thread's database connection is returned
    return started["status"], started["headers"], content


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


DJANGO_KEY = web.AppKey("django_application", object)
EXECUTOR_KEY = web.AppKey("django_executor", ThreadPoolExecutor)


def intake_app() -> web.Application:
    """The intake's aiohttp app: /webhooks/<provider>/, /webhooks/<provider>/inbound/,
    /webhooks/anymail/…, /healthz."""
    app = web.Application(client_max_size=settings.DATA_UPLOAD_MAX_MEMORY_SIZE or 2_621_440)
    app[DJANGO_KEY] = get_wsgi_application()
    app[EXECUTOR_KEY] = ThreadPoolExecutor(DJANGO_VIEW_THREADS, thread_name_prefix="intake-django")

    async def close_executor(app: web.Application) -> None:
        app[EXECUTOR_KEY].shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(close_executor)
    app.router.add_route("*", "/webhooks/anymail/{rest:.*}", django_view)
    # Inbound messages (STOP, HELP) are few and answered with a document: Django's view, as on the web.
    app.router.add_route("*", "/webhooks/{provider:[a-z0-9_]+}/inbound/", django_view)
    app.router.add_get("/webhooks/{provider:[a-z0-9_]+}/", provider_receipts)
    app.router.add_post("/webhooks/{provider:[a-z0-9_]+}/", provider_receipts)
    app.router.add_get("/healthz", healthz)
    return app


def run_intake(host: str, port: int, processes: int = 1) -> None:
    """Serve until SIGTERM or SIGINT; prints one line per process once it listens. With
    `processes` > 1, forks that many servers (before any connection or thread exists) sharing the
    port through SO_REUSEPORT: the kernel spreads connections between them, one core each. This
    process serves too and stops the others when it stops; one that finds itself orphaned stops."""
    children: list[int] = []
    if processes > 1:
        connections.close_all()  # each process opens its own
        for _ in range(processes - 1):
            pid = os.fork()
            if pid == 0:
                try:
                    asyncio.run(_serve(host, port, parent=os.getppid()))
                finally:
                    os._exit(0)
            children.append(pid)
    try:
        asyncio.run(_serve(host, port, parent=None))
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


async def _serve(host: str, port: int, parent: int | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # access_log=None: an access line per receipt costs more than the receipt's own work.
    runner = web.AppRunner(intake_app(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=True).start()
        bound = runner.addresses[0][1]
        # Everything loaded so far (Django, the apps, the adapters) lives as long as the process:
        # out of the collector's sight, a full collection no longer walks it (a pause of tens of
        # milliseconds in every receipt then waiting).
        gc.freeze()
        print(f"receipt intake listening on http://{host}:{bound} (pid {os.getpid()})", flush=True)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            if parent is not None and os.getppid() != parent:
                logger.warning("receipt intake %d: its parent is gone, stopping", os.getpid())
                break
    finally:
        await runner.cleanup()
