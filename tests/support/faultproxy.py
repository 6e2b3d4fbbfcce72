"""A TCP fault proxy (a small Toxiproxy) on asyncio: forwards to a dependency and misbehaves on command."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import signal
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import TracebackType
from typing import Any, Literal, TypeVar

Direction = Literal["both", "upstream", "downstream"]
T = TypeVar("T")

_CHUNK = 64 * 1024
# Per direction, at most this many chunks wait for their delay; a full queue stops reading, so a slow or
# delayed peer pushes back on the sender through TCP instead of growing our memory.
_MAX_QUEUED_CHUNKS = 64
_CONNECT_TIMEOUT = 5.0  # an unreachable upstream must not pin a client connection forever
_CALL_TIMEOUT = 5.0  # how long a control call from another thread waits for the event loop
_MODES = ("pass", "delay", "drop", "reset", "blackhole")


@dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the counters; bytes are those actually forwarded (swallowed bytes don't count)."""

    mode: str
    accepted: int  # connections accepted since start, including dropped and reset ones
    active: int  # connections currently held open
    bytes_upstream: int  # client -> upstream
    bytes_downstream: int  # upstream -> client
    upstream_failures: int  # connections closed because the upstream could not be reached


@dataclass(frozen=True)
class _Mode:
    name: str = "pass"
    delay: float = 0.0  # seconds, only in "delay"
    jitter: float = 0.0
    direction: Direction = "both"

    def hold(self, direction: str) -> float:
        """How long to hold a chunk going this way."""
        if self.name != "delay" or self.direction not in ("both", direction):
            return 0.0
        return self.delay + random.uniform(0, self.jitter) if self.jitter else self.delay


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter):
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task = asyncio.current_task()
        self.closed = False

    def abort(self, rst: bool) -> None:
        """Close both sides now, dropping unsent data, and stop the relay tasks."""
        self.closed = True
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer.transport, rst)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


def _abort(transport: asyncio.WriteTransport, rst: bool) -> None:
    if rst:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # Linger on, timeout 0: close() sends RST instead of FIN, which is what "reset" promises.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # already closed
                pass
    transport.abort()


class FaultProxy:
    """Forwards listen_host:port to the upstream from its own thread and event loop; every method is thread-safe."""

    def __init__(self, upstream_host: str, upstream_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0):
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._mode = _Mode()
        self._links: set[_Link] = set()
        self._accepted = 0
        self._bytes = {"upstream": 0, "downstream": 0}
        self._upstream_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name=f"faultproxy->{self.upstream_port}", daemon=True
        )
        self._thread.start()
        try:
            started.result(timeout=_CALL_TIMEOUT)  # re-raises a bind error here, in the caller's thread
        except BaseException:
            self._thread.join(timeout=_CALL_TIMEOUT)
            self._thread = None
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection (hung ones too) and join the thread; idempotent."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self if self._thread is not None else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._listen_port == 0:
            raise RuntimeError("FaultProxy not started: no port yet")
        return self._listen_port

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    # -- modes -------------------------------------------------------------------------------------

    def delay(self, ms: float, jitter_ms: float = 0, direction: Direction = "both") -> None:
        """Hold every chunk ms + uniform(0, jitter_ms) before forwarding; ms is a floor, order is kept."""
        if ms < 0 or jitter_ms < 0:
            raise ValueError("ms and jitter_ms must be >= 0")
        if direction not in ("both", "upstream", "downstream"):
            raise ValueError(f"direction must be both, upstream or downstream, not {direction!r}")
        self._call(self._set_mode, _Mode("delay", delay=ms / 1000, jitter=jitter_ms / 1000, direction=direction))

    def drop(self) -> None:
        """New connections are accepted and closed at once; existing ones carry on."""
        self._call(self._set_mode, _Mode("drop"))

    def reset(self) -> None:
        """Existing connections and every new one are aborted with RST."""
        self._call(self._set_mode, _Mode("reset"))

    def blackhole(self) -> None:
        """Everything is read and nothing forwarded: clients hang until their own timeout."""
        self._call(self._set_mode, _Mode("blackhole"))

    def cut(self) -> None:
        """Close every current connection now (one-shot); the mode, and new connections, are unaffected."""
        self._call(self._cut)

    def restore(self) -> None:
        """Back to transparent forwarding."""
        self._call(self._set_mode, _Mode())

    def stats(self) -> ProxyStats:
        return self._call(self._snapshot)

    # -- in the loop -------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the proxy's loop, which owns all state, and wait: when a mode method returns it has applied."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn(*args)  # not started (or stopped): nothing else touches the state
        if self._thread is threading.current_thread():
            return fn(*args)

        async def run() -> T:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=_CALL_TIMEOUT)

    def _set_mode(self, mode: _Mode) -> None:
        self._mode = mode
        if mode.name == "reset":
            for link in list(self._links):
                link.abort(rst=True)

    def _cut(self) -> None:
        for link in list(self._links):
            link.abort(rst=False)

    def _snapshot(self) -> ProxyStats:
        return ProxyStats(
            mode=self._mode.name,
            accepted=self._accepted,
            active=len(self._links),
            bytes_upstream=self._bytes["upstream"],
            bytes_downstream=self._bytes["downstream"],
            upstream_failures=self._upstream_failures,
        )

    def _run(self, started: concurrent.futures.Future[None]) -> None:
        try:
            # asyncio.run cancels and awaits any task still alive at the end, so nothing is left pending.
            asyncio.run(self._main(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                raise

    async def _main(self, started: concurrent.futures.Future[None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.listen_host, self._listen_port)
        self._listen_port = server.sockets[0].getsockname()[1]
        started.set_result(None)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            # Connections already accepted have their handler's first step queued: let it run and register
            # the link, since a task cancelled before it ever ran would leave its client socket unclosed.
            await asyncio.sleep(0)
            links = list(self._links)
            for link in links:
                link.abort(rst=False)
            # Await the handlers so their cleanup runs now, not as "Task was destroyed" at loop close.
            await asyncio.gather(*(link.task for link in links if link.task is not None), return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(client_reader, client_writer)
        except asyncio.CancelledError:
            # cut/reset/stop cancel this task on purpose, and cleanup has run; letting it end "cancelled" makes
            # start_server's done-callback (Python 3.11) log a spurious traceback from task.exception().
            pass

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        mode = self._mode
        if mode.name == "drop":
            client_writer.transport.abort()
            return
        if mode.name == "reset":
            _abort(client_writer.transport, rst=True)
            return
        link = _Link(client_writer)
        self._links.add(link)
        graceful = False
        try:
            if mode.name == "blackhole":
                # Born in a blackhole: never reaches the upstream and stays silent for life (restore doesn't
                # revive it), like a connection whose SYN-ACK came from a firewall. Reading keeps the client's
                # writes from blocking, so it hangs on its read timeout, not on a full send buffer.
                while await client_reader.read(_CHUNK):
                    pass
                return
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port), _CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                self._upstream_failures += 1
                return
            link.upstream = upstream_writer
            if link.closed:  # cut or reset while we were connecting
                upstream_writer.transport.abort()
                return
            graceful = await self._relay(client_reader, client_writer, upstream_reader, upstream_writer)
        finally:
            self._links.discard(link)
            for writer in (link.client, link.upstream):
                if writer is None:
                    continue
                # Both sides have sent and received EOF: close politely; otherwise don't wait to flush.
                if graceful:
                    writer.close()
                else:
                    writer.transport.abort()

    async def _relay(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> bool:
        """Pump both directions until both have ended (True) or either side fails (False)."""
        # A reader and a sender per direction, joined by a queue: a delay then holds each chunk for its own
        # due time instead of also throttling reads, so latency is added without capping throughput.
        up: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_MAX_QUEUED_CHUNKS)
        down: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_MAX_QUEUED_CHUNKS)
        tasks = [
            asyncio.create_task(self._read(client_reader, up, "upstream")),
            asyncio.create_task(self._send(up, upstream_writer, "upstream")),
            asyncio.create_task(self._read(upstream_reader, down, "downstream")),
            asyncio.create_task(self._send(down, client_writer, "downstream")),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            return len(done) == len(tasks) and all(task.exception() is None for task in done)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]], direction: str
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_CHUNK)  # b"" is EOF: queued too, so the half-close keeps its place
            # Stamped on arrival, so time spent queued behind earlier chunks counts toward the delay.
            await queue.put((loop.time() + self._mode.hold(direction), data))
            if not data:
                return

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, direction: str
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            # FIFO and one sender: a chunk whose jitter made it due earlier than its predecessor still waits
            # behind it, so the byte stream is never reordered.
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                # EOF is passed on even in blackhole: a peer that closes is seen closing, so the other side's
                # connection is released rather than leaked; clients waiting for a reply still hang.
                if writer.can_write_eof():
                    writer.write_eof()
                return
            if self._mode.name == "blackhole":  # checked per chunk: existing connections go silent too
                continue
            writer.write(data)
            await writer.drain()
            self._bytes[direction] += len(data)


# -- CLI: the proxy plus a JSON control endpoint, for benchmarks in another process ----------------


def _apply_command(proxy: FaultProxy, command: dict[str, Any]) -> None:
    """Apply {"mode": ...} as sent to POST /mode; ValueError when it makes no sense."""
    mode = command.get("mode")
    if mode in ("pass", "restore"):
        proxy.restore()
    elif mode == "delay":
        proxy.delay(float(command.get("ms", 0)), float(command.get("jitter_ms", 0)), command.get("direction", "both"))
    elif mode in ("drop", "reset", "blackhole", "cut"):
        getattr(proxy, mode)()
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join((*_MODES, 'cut', 'restore'))}")


def _control_handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class ControlHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/stats":
                self._reply(200, asdict(proxy.stats()))
            else:
                self._reply(404, {"error": f"no such endpoint: GET {self.path}"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/mode":
                self._reply(404, {"error": f"no such endpoint: POST {self.path}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body must be a JSON object")
                _apply_command(proxy, body)
            except (ValueError, TypeError) as exc:
                self._reply(400, {"error": str(exc)})
                return
            self._reply(200, asdict(proxy.stats()))

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a benchmark's output is not the place for an access log

    return ControlHandler


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.faultproxy", description=__doc__)
    parser.add_argument("--listen", type=_host_port, required=True, help="HOST:PORT to accept on (port 0: any)")
    parser.add_argument("--upstream", type=_host_port, required=True, help="HOST:PORT to forward to")
    parser.add_argument(
        "--control", type=_host_port, default=("127.0.0.1", 0), help="HOST:PORT of the JSON control endpoint"
    )
    args = parser.parse_args(argv)

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(0)  # unwinds serve_forever() so the finally below shuts down cleanly

    signal.signal(signal.SIGTERM, terminate)
    proxy = FaultProxy(args.upstream[0], args.upstream[1], args.listen[0], args.listen[1]).start()
    try:
        httpd = HTTPServer(args.control, _control_handler(proxy))
        try:
            control_host, control_port = httpd.server_address[:2]
            # One JSON line on stdout, so a parent that asked for port 0 learns the real ports.
            ready = {
                "listen": f"{proxy.listen_host}:{proxy.port}",
                "upstream": f"{proxy.upstream_host}:{proxy.upstream_port}",
                "control": f"http://{control_host}:{control_port}",
            }
            print(json.dumps(ready), flush=True)
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
