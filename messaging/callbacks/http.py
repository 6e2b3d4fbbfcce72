"""A lean HTTP/1.1 client for status callbacks: POST a small body, read the status and little else.

Hand-written on asyncio streams because the deliverer must push ~1,800 callbacks/s on a 2-core
box next to everything else, and aiohttp's client cost 135-180 µs of CPU per request where this
one costs 64-73 µs (20,000 POSTs, 16 in flight, to a minimal keep-alive asyncio server on the
same box; a bare streams loop without pool, timeout or parsing: ~40-55 µs). It does only what a
callback needs: keep-alive connections pooled per origin (at most `concurrency` open in all),
https with certificates verified, one timeout over the whole exchange, answers read to 64 KiB
at most. No redirects (a 3xx is just a status), no cookies, no proxies, no Expect: 100-continue.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import urlsplit

# A receiver's answer is read this far (we only need its status); a longer one closes the
# connection instead of being read on. Its headers may take as much again.
MAX_ANSWER_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
IDLE_SECONDS = 30.0  # an idle pooled connection older than this is closed, not reused
DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpError(Exception):
    """The request got no answer: `timeout` is True when the time ran out, `blocked` when the host
    resolved to an address we may not connect to, else a connection or protocol failure; the text
    says what happened."""

    def __init__(self, detail: str, *, timeout: bool = False, blocked: bool = False) -> None:
        super().__init__(detail)
        self.timeout = timeout
        self.blocked = blocked


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value


class _NoAnswer(Exception):
    """A connection closed or reset before any byte of the answer (a pooled one may be retried)."""


class _Conn:
    __slots__ = ("reader", "writer", "idle_since")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.idle_since = reader, writer, 0.0


class HttpClient:
    """Keep-alive connections pooled per (scheme, host, port); at most `concurrency` requests in
    flight and `concurrency` connections open (an idle one is closed to make room for a new one).
    Used on one event loop."""

    def __init__(
        self,
        concurrency: int,
        *,
        user_agent: str,
        ssl_context: ssl.SSLContext | None = None,
        address_allowed: Callable[[str], bool] | None = None,
    ) -> None:
        self.user_agent = user_agent
        # Asked of every address a host resolves to before a connection is opened (None: any).
        self.address_allowed = address_allowed
        self.limit = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self.open_connections = 0
        self.connections_made = 0  # for tests and metrics: how often a new connection was opened
        self.closed = False

    async def post(self, url: str, body: bytes, headers: dict[str, str], *, timeout_s: float) -> Answer:
        """POST `body` to `url` with `headers` (lower-case names, values ours: not checked for CR/LF;
        Host, Content-Length and, unless given, User-Agent are added). Raises HttpError when no
        answer came within `timeout_s` or the exchange failed."""
        origin, head = self._request_head(url, body, headers)
        async with self._slots:
            try:
                async with asyncio.timeout(timeout_s):
                    return await self._exchange(origin, head + body)
            except TimeoutError:
                raise HttpError(f"no answer within {timeout_s:g} s", timeout=True) from None
            except asyncio.IncompleteReadError as exc:
                raise HttpError(f"connection closed mid-answer ({len(exc.partial)} bytes read)") from None
            except asyncio.LimitOverrunError:
                raise HttpError("answer headers too long") from None
            except _NoAnswer as exc:
                raise HttpError(f"connection closed before any answer: {exc}") from None
            except HttpError:
                raise
            except (OSError, ValueError) as exc:  # refused, reset, DNS, TLS, a malformed answer
                raise HttpError(f"{type(exc).__name__}: {exc}"[:300]) from None

    async def close(self) -> None:
        """Close every idle connection (those in use close when their request ends)."""
        self.closed = True
        for pool in self._idle.values():
            for conn in pool:
                self._discard(conn)
        self._idle.clear()

    def _request_head(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[tuple[str, str, int], bytes]:
        origin, start = _request_start(url)
        lines = [start, f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if "user-agent" not in headers:
            lines.append(f"User-Agent: {self.user_agent}")
        try:
            return origin, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        except UnicodeEncodeError:
            raise HttpError("invalid header: not ASCII") from None

    async def _exchange(self, origin: tuple[str, str, int], request: bytes) -> Answer:
        conn = self._pooled(origin)
        if conn is not None:
            try:
                return await self._attempt(origin, conn, request)
            except _NoAnswer:
                # The server closed the pooled connection meanwhile: once more on a new one (the
                # receiver may see the callback twice; it has the same webhook-id).
                pass
        return await self._attempt(origin, await self._connect(origin), request)

    async def _attempt(self, origin: tuple[str, str, int], conn: _Conn, request: bytes) -> Answer:
        try:
            try:
                conn.writer.write(request)
                await conn.writer.drain()
                first = await conn.reader.read(1)  # alone: an error before it is "no answer"
            except OSError as exc:
                raise _NoAnswer(f"{type(exc).__name__}: {exc}") from None
            if not first:
                raise _NoAnswer("EOF")
            answer, reusable = await _read_answer(conn.reader, first)
        except BaseException:  # an error, the timeout, a cancel: the connection's state is unknown
            self._discard(conn)
            raise
        if reusable and not self.closed:
            self._release(origin, conn)
        else:
            self._discard(conn)
        return answer

    def _pooled(self, origin: tuple[str, str, int]) -> _Conn | None:
        pool = self._idle.get(origin)
        while pool:
            conn = pool.pop()  # the most recently used: the least likely to have been closed
            if time.monotonic() - conn.idle_since < IDLE_SECONDS and not conn.reader.at_eof():
                return conn
            self._discard(conn)
        return None

    async def _connect(self, origin: tuple[str, str, int]) -> _Conn:
        if self.open_connections >= self.limit:
            self._evict_oldest_idle()
        scheme, host, port = origin
        self.open_connections += 1  # counted from the attempt: a slot is taken while connecting
        try:
            address = await self._checked_address(host, port)
            if scheme == "https":
                if self._ssl is None:
                    self._ssl = ssl.create_default_context()  # verifies certificates and host names
                opened = asyncio.open_connection(
                    address, port, ssl=self._ssl, server_hostname=host, limit=MAX_HEAD_BYTES
                )
            else:
                opened = asyncio.open_connection(address, port, limit=MAX_HEAD_BYTES)
            reader, writer = await opened
        except BaseException:
            self.open_connections -= 1
            raise
        self.connections_made += 1
        return _Conn(reader, writer)

    async def _checked_address(self, host: str, port: int) -> str:
        """The address to connect to: the host itself when any is allowed, else the first it
        resolves to, all of them checked (one private answer among public ones refuses the host:
        a second look-up could pick it). Connecting to the checked address, not the name, leaves a
        DNS answer that changes in between no way in."""
        if self.address_allowed is None:
            return host
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        refused = [address for address in addresses if not self.address_allowed(address)]
        if refused or not addresses:
            raise HttpError(
                f"{host} resolves to {refused[0] if refused else 'nothing'}: not a public address, "
                "callbacks are not sent there",
                blocked=True,
            )
        return addresses[0]

    def _evict_oldest_idle(self) -> None:
        # Requests in flight are fewer than the limit (the semaphore) and this one has no
        # connection yet, so at the limit at least one open connection is idle.
        pools = [pool for pool in self._idle.values() if pool]
        if pools:
            self._discard(min(pools, key=lambda pool: pool[0].idle_since).pop(0))

    def _release(self, origin: tuple[str, str, int], conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle.setdefault(origin, []).append(conn)

    def _discard(self, conn: _Conn) -> None:
        self.open_connections -= 1
        conn.writer.transport.abort()  # nothing of ours is worth flushing: no close handshake


@lru_cache(maxsize=1024)  # an endpoint's URL is parsed once, not per callback
def _request_start(url: str) -> tuple[tuple[str, str, int], str]:
    """The URL's origin (scheme, host, port) and the request's first lines (request line, Host)."""
    if not url.isprintable() or " " in url:
        raise HttpError("invalid URL: it has whitespace or control characters")
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme, parts.hostname, parts.port
    except ValueError as exc:
        raise HttpError(f"invalid URL: {exc}") from None
    if scheme not in DEFAULT_PORTS:
        raise HttpError(f"invalid URL: scheme {scheme!r} is not http or https")
    if parts.username is not None or parts.password is not None:
        raise HttpError("invalid URL: user or password in it")
    if not host:
        raise HttpError("invalid URL: no host")
    port = port or DEFAULT_PORTS[scheme]
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        host_header = host if host.isascii() else host.encode("idna").decode()
        target.encode("ascii")
    except UnicodeError:
        raise HttpError("invalid URL: not ASCII (a host not IDNA-encodable, a path not %-encoded)") from None
    host_header = f"[{host_header}]" if ":" in host_header else host_header
    if port != DEFAULT_PORTS[scheme]:
        host_header += f":{port}"
    return (scheme, host, port), f"POST {target} HTTP/1.1\r\nHost: {host_header}"


async def _read_answer(reader: asyncio.StreamReader, first: bytes) -> tuple[Answer, bool]:
    """The answer's status and headers, its body read and dropped; and whether the connection
    may carry another request (body read to its end, HTTP/1.1, no `Connection: close`)."""
    head = first + await reader.readuntil(b"\r\n\r\n")
    version, status, headers = _parse_head(head)
    while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints): the real one follows
        version, status, headers = _parse_head(await reader.readuntil(b"\r\n\r\n"))
    reusable = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
    if status in (204, 304):
        return Answer(status, headers), reusable
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return Answer(status, headers), reusable and await _read_chunked(reader)
    if "transfer-encoding" not in headers and "content-length" in headers:
        length = headers["content-length"]
        if not length.isdigit():
            raise ValueError(f"malformed Content-Length {length[:40]!r}")
        if int(length) > MAX_ANSWER_BYTES:
            return Answer(status, headers), False
        await reader.readexactly(int(length))
        return Answer(status, headers), reusable
    total = 0  # read until EOF (or past the limit): the connection ends with the body
    while total <= MAX_ANSWER_BYTES and (chunk := await reader.read(MAX_ANSWER_BYTES + 1 - total)):
        total += len(chunk)
    return Answer(status, headers), False


def _parse_head(head: bytes) -> tuple[str, int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or not rest[:3].isdigit() or rest[3:4] not in ("", " "):
        raise ValueError(f"malformed status line {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        if line:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                raise ValueError(f"malformed header line {line[:80]!r}")
            headers[name.lower()] = value.strip()
    return version, int(rest[:3]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bool:
    """Read a chunked body to its end (True) or until it passes MAX_ANSWER_BYTES (False)."""
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)  # ValueError: malformed
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, if any
                pass
            return True
        total += size
        if total > MAX_ANSWER_BYTES:
            return False
        await reader.readexactly(size + 2)  # the data and its CRLF
