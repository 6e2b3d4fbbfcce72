"""The callbacks' HTTP client (messaging.callbacks.http) against real local servers.

Each server is an asyncio server on its own loop in a thread (plain TCP or TLS with a certificate
made here), answering each request with bytes a test chooses, so keep-alive, bodies, closes and
stalls are exactly what the test says; it counts connections and requests and is stopped in a
`finally` (the context manager) whatever the test does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import queue
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from messaging.callbacks import http
from messaging.callbacks.http import MAX_ANSWER_BYTES, HttpClient, HttpError
from messaging.callbacks.retries import CONNECTION, TIMEOUT
from messaging.callbacks.sender import CallbackRequest, CallbackResponse, CallbackSender
from messaging.callbacks.signing import new_secret
from tests.support.processes import free_port

BODY = b'{"type":"message.delivered","data":{"sequence":1}}'
HEADERS = {"webhook-id": "msg_1", "content-type": "application/json"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

KEEP, CLOSE, HOLD, DROP = (
    "keep",
    "close",
    "hold",
    "drop",
)  # after the answer: go on, close, never answer, close unanswered


@dataclass
class Seen:
    head: bytes
    body: bytes
    connection: int  # the server's connection number, from 0
    on_connection: int  # the request's number on that connection, from 0


Respond = Callable[[Seen], tuple[bytes, str]]


class LocalServer:
    """An HTTP/1.x server on 127.0.0.1 whose answers `respond` gives: (bytes, what then)."""

    def __init__(self, respond: Respond, ssl_context: ssl.SSLContext | None = None) -> None:
        self.respond, self.ssl_context = respond, ssl_context
        self.requests: list[Seen] = []
        self.connections = 0
        self.open = 0
        self.max_open = 0
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        ready = threading.Event()

        async def listen() -> None:
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(listen(), self.loop).result(5)
        assert ready.is_set()

    def stop(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def url(self, path: str = "/hook") -> str:
        origin = "https://localhost" if self.ssl_context else "http://127.0.0.1"  # TLS: the certificate's name
        return f"{origin}:{self.port}{path}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        number, self.connections = self.connections, self.connections + 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        try:
            for on_connection in range(10_000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line[15:]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0
                )
                seen = Seen(head, await reader.readexactly(length), number, on_connection)
                self.requests.append(seen)
                answer, then = self.respond(seen)
                writer.write(answer)
                await writer.drain()
                if then == HOLD:
                    await reader.read()  # until the client gives up and closes
                if then in (CLOSE, DROP):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            writer.transport.abort()
            self.tasks.discard(asyncio.current_task())


@contextmanager
def serving(respond: Respond, ssl_context: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    server = LocalServer(respond, ssl_context)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def always(answer: bytes, then: str = KEEP) -> Respond:
    return lambda seen: (answer, then)


def run(coroutine):
    return asyncio.run(coroutine)


async def posts(client: HttpClient, url: str, count: int, *, timeout_s: float = 5.0) -> list[int]:
    return [(await client.post(url, BODY, HEADERS, timeout_s=timeout_s)).status for _ in range(count)]


def wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# Keep-alive and the request's shape


def test_one_connection_carries_many_requests_and_the_request_is_as_specified():
    with serving(always(OK)) as server:

        async def scenario() -> list[int]:
            client = HttpClient(4, user_agent="Test-Agent/1")
            statuses = await posts(client, server.url("/hook/a?x=1&y=2"), 50)
            assert client.connections_made == 1 and client.open_connections == 1
            await client.close()
            assert client.open_connections == 0
            return statuses

        assert run(scenario()) == [200] * 50
        assert server.connections == 1 and len(server.requests) == 50
        lines = server.requests[0].head.decode().split("\r\n")
        assert lines[0] == "POST /hook/a?x=1&y=2 HTTP/1.1"
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        assert headers["host"] == f"127.0.0.1:{server.port}"
        assert headers["content-length"] == str(len(BODY))
        assert headers["user-agent"] == "test-agent/1"
        assert headers["webhook-id"] == "msg_1" and headers["content-type"] == "application/json"
        assert "expect" not in headers and "connection" not in headers
        assert server.requests[0].body == BODY


def test_requests_in_flight_together_share_at_most_concurrency_connections():
    slow = b"HTTP/1.1 204 No Content\r\n\r\n"

    def respond(seen: Seen) -> tuple[bytes, str]:
        time.sleep(0.005)  # blocks the server's loop: the client's requests pile up
        return slow, KEEP

    with serving(respond) as server:

        async def scenario() -> None:
            client = HttpClient(3, user_agent="t")
            answers = await asyncio.gather(*(client.post(server.url(), BODY, HEADERS, timeout_s=5) for _ in range(30)))
            assert {answer.status for answer in answers} == {204}
            assert client.connections_made <= 3 and client.open_connections <= 3
            await client.close()

        run(scenario())
        assert server.max_open <= 3 and len(server.requests) == 30


def test_at_the_limit_an_idle_connection_to_another_origin_is_closed_for_a_new_one():
    with serving(always(OK)) as first, serving(always(OK)) as second:

        async def scenario() -> None:
            client = HttpClient(1, user_agent="t")
            assert await posts(client, first.url(), 1) == [200]
            assert await posts(client, second.url(), 1) == [200]
            assert client.open_connections == 1
            await client.close()

        run(scenario())
        wait_for(lambda: first.open == 0)  # its idle connection was closed to make room


def test_an_idle_connection_past_the_idle_limit_is_not_reused(monkeypatch):
    monkeypatch.setattr(http, "IDLE_SECONDS", 0.05)
    with serving(always(OK)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            await posts(client, server.url(), 1)
            await asyncio.sleep(0.1)
            await posts(client, server.url(), 1)
            assert client.connections_made == 2 and client.open_connections == 1
            await client.close()

        run(scenario())
        wait_for(lambda: server.open == 0)


# Answer bodies


@pytest.mark.parametrize(
    ("answer", "status", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, True),
        (
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n",
            201,
            True,
        ),
        (b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n", 202, True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, True),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", 304, True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, False),
    ],
    ids=["content-length", "chunked", "chunked-trailers", "204", "304", "100-continue", "connection-close", "http-1.0"],
)
def test_the_answer_is_read_and_the_connection_reused_only_when_it_may_be(answer, status, reused):
    # The server closes after an answer that says so (as a server would), else keeps it open.
    with serving(always(answer, KEEP if reused else CLOSE)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            assert await posts(client, server.url(), 3) == [status] * 3
            assert client.connections_made == (1 if reused else 3)
            await client.close()

        run(scenario())
        assert server.connections == (1 if reused else 3)


def test_a_body_without_length_is_read_to_eof_and_the_connection_not_reused():
    with serving(always(b"HTTP/1.1 200 OK\r\n\r\nsome body until the end", CLOSE)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            assert await posts(client, server.url(), 2) == [200, 200]
            assert client.connections_made == 2 and client.open_connections == 0
            await client.close()

        run(scenario())


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_oversize_answer_gives_its_status_and_closes_the_connection(chunked):
    big = MAX_ANSWER_BYTES + 1000
    if chunked:
        answer = (
            b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % big + b"x" * big + b"\r\n0\r\n\r\n"
        )
    else:
        answer = b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % big + b"x" * big
    with serving(always(answer)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            assert await posts(client, server.url(), 2) == [500, 500]
            assert client.connections_made == 2 and client.open_connections == 0
            await client.close()

        run(scenario())
        wait_for(lambda: server.open == 0)  # the client closed both


def test_answer_headers_past_64_kib_are_a_connection_error():
    answer = b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * (70 * 1024) + b"\r\nContent-Length: 0\r\n\r\n"
    with serving(always(answer)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            with pytest.raises(HttpError, match="answer headers too long") as caught:
                await posts(client, server.url(), 1)
            assert not caught.value.timeout and client.open_connections == 0
            await client.close()

        run(scenario())


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"HTTP/2 200\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "connection closed mid-answer"),
    ],
)
def test_a_malformed_or_cut_answer_is_a_connection_error(answer, match):
    with serving(always(answer, CLOSE)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            with pytest.raises(HttpError, match=match):
                await posts(client, server.url(), 1)
            assert client.open_connections == 0
            await client.close()

        run(scenario())


# Connections the server closed, refused, stalled


def test_a_pooled_connection_the_server_closed_while_idle_is_replaced():
    with serving(always(OK, CLOSE)) as server:  # answers without `Connection: close`, then closes

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            await posts(client, server.url(), 1)
            await asyncio.sleep(0.1)
            assert await posts(client, server.url(), 1) == [200]
            assert client.connections_made == 2
            await client.close()

        run(scenario())
        assert len(server.requests) == 2


def test_a_pooled_connection_closed_unanswered_is_retried_once_on_a_new_one():
    # Each connection answers its first request and closes on the second without a byte: the
    # client only learns of it after sending (the race of a server's idle timeout).
    with serving(lambda seen: (OK, KEEP) if seen.on_connection == 0 else (b"", DROP)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            assert await posts(client, server.url(), 2) == [200, 200]
            assert client.connections_made == 2
            await client.close()

        run(scenario())
        assert [(seen.connection, seen.on_connection) for seen in server.requests] == [(0, 0), (0, 1), (1, 0)]


def test_no_retry_once_some_of_the_answer_was_read():
    with serving(lambda seen: (OK, KEEP) if seen.on_connection == 0 else (b"HTTP/1.1 20", DROP)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            await posts(client, server.url(), 1)
            with pytest.raises(HttpError, match="mid-answer"):
                await posts(client, server.url(), 1)
            await client.close()

        run(scenario())
        assert len(server.requests) == 2


def test_no_retry_on_a_new_connection_closed_unanswered():
    with serving(always(b"", DROP)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            with pytest.raises(HttpError, match="closed before any answer"):
                await posts(client, server.url(), 1)
            await client.close()

        run(scenario())
        assert len(server.requests) == 1


def test_connection_refused_is_a_connection_error():
    async def scenario() -> None:
        client = HttpClient(2, user_agent="t")
        with pytest.raises(HttpError, match="ConnectionRefusedError") as caught:
            await posts(client, f"http://127.0.0.1:{free_port()}/hook", 1)
        assert not caught.value.timeout and client.open_connections == 0

    run(scenario())


def test_a_server_that_never_answers_times_out_within_the_timeout():
    with serving(always(b"", HOLD)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            began = time.monotonic()
            with pytest.raises(HttpError, match="no answer within 0.3 s") as caught:
                await posts(client, server.url(), 1, timeout_s=0.3)
            assert caught.value.timeout and 0.3 <= time.monotonic() - began < 1.0
            assert client.open_connections == 0  # closed, never back in the pool
            await client.close()

        run(scenario())
        wait_for(lambda: server.open == 0)


def test_a_redirect_is_a_status_not_followed():
    answer = b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n"
    with serving(always(answer)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            answer = await client.post(server.url(), BODY, HEADERS, timeout_s=5)
            assert answer.status == 302 and answer.headers["location"] == "http://127.0.0.1:1/elsewhere"
            await client.close()

        run(scenario())
        assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://example.com/hook", "scheme 'ftp' is not http or https"),
        ("https://user:secret@example.com/hook", "user or password"),
        ("http:///hook", "no host"),
        ("http://example.com/a b", "whitespace"),
        ("http://example.com:99999/", "invalid URL"),
    ],
)
def test_urls_we_do_not_send_to_are_connection_errors(url, match):
    async def scenario() -> None:
        with pytest.raises(HttpError, match=match):
            await HttpClient(2, user_agent="t").post(url, BODY, HEADERS, timeout_s=1)

    run(scenario())


# TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for the name localhost (not 127.0.0.1): (cert file, key file, PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (folder / "cert.pem").write_bytes(pem)
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem", pem


@contextmanager
def tls_server(certificate, respond: Respond) -> Iterator[LocalServer]:
    cert_file, key_file, _ = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    with serving(respond, context) as server:
        yield server


def test_https_with_an_untrusted_certificate_is_a_connection_error(certificate):
    with tls_server(certificate, always(OK)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t")
            with pytest.raises(HttpError, match="CERTIFICATE_VERIFY_FAILED") as caught:
                await posts(client, server.url(), 1)
            assert not caught.value.timeout and client.open_connections == 0
            await client.close()

        run(scenario())
        assert server.requests == []


def test_https_with_the_certificate_trusted_is_sent_over_one_kept_alive_connection(certificate):
    trusting = ssl.create_default_context(cadata=certificate[2].decode())
    with tls_server(certificate, always(OK)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t", ssl_context=trusting)
            assert await posts(client, server.url(), 5) == [200] * 5
            assert client.connections_made == 1
            await client.close()

        run(scenario())
        assert server.connections == 1
        assert f"Host: localhost:{server.port}\r\n".encode() in server.requests[0].head


def test_https_checks_the_host_name_too(certificate):
    trusting = ssl.create_default_context(cadata=certificate[2].decode())
    with tls_server(certificate, always(OK)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t", ssl_context=trusting)
            with pytest.raises(HttpError, match="CERTIFICATE_VERIFY_FAILED"):
                await posts(client, f"https://127.0.0.1:{server.port}/hook", 1)  # the same server, another name
            await client.close()

        run(scenario())


# Through the sender: what the deliverer gets


def sent(sender: CallbackSender, url: str, *, timeout_s: float = 5.0) -> CallbackResponse:
    answers: queue.SimpleQueue[CallbackResponse] = queue.SimpleQueue()
    secret = {"secret": new_secret(), "created_at": "2026-01-01T00:00:00+00:00", "expires_at": None}
    sender.submit([CallbackRequest(7, url, "msg_7", BODY, [secret])], timeout_s=timeout_s, answer=answers.put)
    return answers.get(timeout=timeout_s + 5)


def test_the_sender_reports_status_retry_after_and_errors_as_the_deliverer_expects():
    limited = b"HTTP/1.1 429 Too Many\r\nRetry-After: 7\r\nContent-Length: 0\r\n\r\n"
    sender = CallbackSender(4)
    try:
        with serving(always(limited)) as server, serving(always(b"", HOLD)) as silent:
            answer = sent(sender, server.url())
            assert (answer.key, answer.status, answer.error, answer.retry_after) == (7, 429, "", "7")
            headers = server.requests[0].head.decode().lower()
            assert "webhook-signature: v1," in headers and "user-agent: conductor-callbacks/1" in headers

            answer = sent(sender, silent.url(), timeout_s=0.3)
            assert (answer.status, answer.error, answer.detail) == (None, TIMEOUT, "no answer within 0.3 s")
            assert 0.3 <= answer.latency_s < 1.0

        answer = sent(sender, f"http://127.0.0.1:{free_port()}/hook")
        assert (answer.status, answer.error) == (None, CONNECTION) and "ConnectionRefusedError" in answer.detail
        answer = sent(sender, "ftp://example.com/hook")
        assert (answer.status, answer.error) == (None, CONNECTION) and "not http or https" in answer.detail
    finally:
        sender.close()


# Destinations (messaging.callbacks.destinations): no callbacks into our own network


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_client_for_public_addresses_only_refuses_a_host_resolving_to_loopback_before_connecting(host):
    from messaging.callbacks.destinations import address_allowed

    with serving(always(OK)) as server:

        async def scenario() -> None:
            client = HttpClient(2, user_agent="t", address_allowed=address_allowed)
            with pytest.raises(HttpError) as refused:
                await client.post(f"http://{host}:{server.port}/hook", BODY, HEADERS, timeout_s=5)
            assert refused.value.blocked and not refused.value.timeout
            assert "not a public address" in str(refused.value)
            assert client.open_connections == 0 and client.connections_made == 0
            await client.close()

        run(scenario())
        assert server.connections == 0  # nothing reached the server


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("93.184.215.14", True),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", True),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("127.0.0.1", False),
        ("169.254.169.254", False),  # a cloud's metadata service
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_only_public_addresses_are_allowed(address, allowed):
    from messaging.callbacks.destinations import address_allowed

    assert address_allowed(address) is allowed
