"""The TCP fault proxy: every mode against a local echo server and the real Redis, and the CLI's control endpoint."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.faultproxy import FaultProxy

REPO = Path(__file__).resolve().parents[1]
REDIS_PORT = 6379
REDIS_DB = 11  # the only database these tests may write to or flush


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
            self.request.shutdown(socket.SHUT_WR)  # answer a half-close with ours, as a well-behaved peer
        except OSError:  # the proxy cut or reset us
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128  # the default 5 overflows with 50 simultaneous connects: 1 s SYN retries


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(65536, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def echo_round_trip(address: tuple[str, int], payload: bytes = b"ping", timeout: float = 3.0) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(payload)
        return recv_exactly(sock, len(payload))


def timed(fn: Callable[[], object]) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def echo_proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port) as proxy:
        yield proxy


@pytest.fixture
def redis_proxy() -> Iterator[FaultProxy]:
    try:
        redis.Redis(port=REDIS_PORT, db=REDIS_DB, socket_timeout=1).ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis on 127.0.0.1:{REDIS_PORT}")
    with FaultProxy("127.0.0.1", REDIS_PORT) as proxy:
        yield proxy


@pytest.fixture
def make_redis(redis_proxy: FaultProxy) -> Iterator[Callable[..., redis.Redis]]:
    """Clients through the proxy, without retries so each fault surfaces as exactly one error."""
    clients: list[redis.Redis] = []

    def make(socket_timeout: float = 2.0) -> redis.Redis:
        client = redis.Redis(
            port=redis_proxy.port,
            db=REDIS_DB,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


# -- pass ------------------------------------------------------------------------------------------


def test_echo_passes_through_and_half_close_is_forwarded(echo_proxy: FaultProxy) -> None:
    payload = os.urandom(300_000)  # several chunks each way
    with socket.create_connection(echo_proxy.address, timeout=3) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()  # send and read at once: neither side's buffers need to hold it all
        echoed = recv_exactly(sock, len(payload))
        sender.join()
        sock.shutdown(socket.SHUT_WR)  # the echo server sees EOF only if the proxy passes the half-close on
        assert sock.recv(1) == b""  # ... and answers with its own, which the proxy passes back
    assert echoed == payload
    wait_for(lambda: echo_proxy.stats().active == 0, what="the connection to be released")
    stats = echo_proxy.stats()
    assert (stats.mode, stats.accepted, stats.bytes_upstream, stats.bytes_downstream) == (
        "pass",
        1,
        len(payload),
        len(payload),
    )


def test_redis_passes_through(make_redis: Callable[..., redis.Redis]) -> None:
    client = make_redis()
    client.set("faultproxy:key", b"value", ex=30)
    assert client.get("faultproxy:key") == b"value"
    assert client.connection_pool.connection_kwargs["port"] != REDIS_PORT


def test_fifty_concurrent_clients_all_get_their_echoes(echo_proxy: FaultProxy) -> None:
    clients = 50
    everyone_connected = threading.Barrier(clients, timeout=5)

    def client(index: int) -> bool:
        payload = f"client-{index}:".encode() * 2000
        with socket.create_connection(echo_proxy.address, timeout=5) as sock:
            everyone_connected.wait()  # all 50 connections are open before anyone talks
            sock.sendall(payload)
            return recv_exactly(sock, len(payload)) == payload

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    assert all(results)
    assert echo_proxy.stats().accepted == clients


def test_unreachable_upstream_closes_the_client() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with FaultProxy("127.0.0.1", dead_port) as proxy, socket.create_connection(proxy.address, timeout=3) as sock:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
            wait_for(lambda: proxy.stats().upstream_failures == 1, what="the failure to be counted")


# -- delay -----------------------------------------------------------------------------------------


def test_delay_adds_latency_per_direction_on_echo(echo_proxy: FaultProxy) -> None:
    with socket.create_connection(echo_proxy.address, timeout=3) as sock:

        def round_trip() -> None:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"

        echo_proxy.delay(100)
        assert timed(round_trip) >= 0.2  # both directions: once each way
        echo_proxy.delay(100, direction="upstream")
        assert 0.1 <= timed(round_trip) < 0.2
        echo_proxy.delay(100, direction="downstream")
        assert 0.1 <= timed(round_trip) < 0.2
        echo_proxy.delay(50, jitter_ms=50)
        assert timed(round_trip) >= 0.1  # the jitter only ever adds
        echo_proxy.restore()
        assert timed(round_trip) < 0.1


def test_delay_adds_latency_on_redis(redis_proxy: FaultProxy, make_redis: Callable[..., redis.Redis]) -> None:
    client = make_redis()
    client.ping()
    redis_proxy.delay(100)
    assert timed(client.ping) >= 0.2
    redis_proxy.restore()
    assert timed(client.ping) < 0.1


def test_delay_keeps_the_byte_stream_in_order(echo_proxy: FaultProxy) -> None:
    echo_proxy.delay(5, jitter_ms=20)  # jitter larger than the gap between chunks
    with socket.create_connection(echo_proxy.address, timeout=5) as sock:
        sent = b""
        for index in range(20):
            chunk = f"<{index}>".encode()
            sock.sendall(chunk)
            sent += chunk
            time.sleep(0.002)  # separate chunks, not one coalesced write
        assert recv_exactly(sock, len(sent)) == sent


# -- drop, reset, blackhole, cut ------------------------------------------------------------------


def test_drop_closes_new_connections_and_spares_existing_ones(
    echo_proxy: FaultProxy, redis_proxy: FaultProxy, make_redis: Callable[..., redis.Redis]
) -> None:
    with socket.create_connection(echo_proxy.address, timeout=3) as existing:
        existing.sendall(b"a")
        assert existing.recv(1) == b"a"
        echo_proxy.drop()
        redis_proxy.drop()
        with pytest.raises(redis.ConnectionError):
            make_redis().ping()
        with socket.create_connection(echo_proxy.address, timeout=3) as fresh:
            try:
                assert fresh.recv(1) == b""
            except ConnectionResetError:  # also "closed", if our bytes reached it first
                pass
        existing.sendall(b"b")
        assert existing.recv(1) == b"b"
    assert echo_proxy.stats().mode == "drop"


def test_reset_aborts_existing_and_new_connections_with_rst(
    echo_proxy: FaultProxy, redis_proxy: FaultProxy, make_redis: Callable[..., redis.Redis]
) -> None:
    client = make_redis()
    client.ping()
    with socket.create_connection(echo_proxy.address, timeout=3) as existing:
        existing.sendall(b"a")
        assert existing.recv(1) == b"a"
        echo_proxy.reset()
        with pytest.raises(ConnectionResetError):  # RST, not a FIN's orderly b""
            existing.recv(1)
    redis_proxy.reset()
    with pytest.raises(redis.ConnectionError):
        client.ping()  # its pooled connection was reset
    with pytest.raises(redis.ConnectionError):
        make_redis().ping()  # and so is a new one
    # The RST comes right after the handshake: on a busy machine connect() itself may report it.
    with pytest.raises(ConnectionResetError), socket.create_connection(echo_proxy.address, timeout=3) as fresh:
        fresh.recv(1)


def test_blackhole_makes_redis_time_out_within_its_socket_timeout(
    redis_proxy: FaultProxy, make_redis: Callable[..., redis.Redis]
) -> None:
    timeout = 0.3
    existing = make_redis(socket_timeout=timeout)
    existing.ping()
    redis_proxy.blackhole()
    before = redis_proxy.stats()
    for client in (existing, make_redis(socket_timeout=timeout)):  # an open connection, then a new one
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert timeout <= time.monotonic() - started < timeout + 0.5
    after = redis_proxy.stats()
    assert (after.bytes_upstream, after.bytes_downstream) == (before.bytes_upstream, before.bytes_downstream)


def test_blackhole_swallows_echoes(echo_proxy: FaultProxy) -> None:
    echo_proxy.blackhole()
    with socket.create_connection(echo_proxy.address, timeout=0.2) as sock:
        sock.sendall(b"anyone?")
        with pytest.raises(TimeoutError):
            sock.recv(1)


def test_cut_breaks_open_connections_and_the_next_command_reconnects(
    redis_proxy: FaultProxy, make_redis: Callable[..., redis.Redis]
) -> None:
    raw = redis.Connection(port=redis_proxy.port, db=REDIS_DB, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    client = make_redis()
    try:
        raw.send_command("PING")
        assert raw.read_response() == b"PONG"
        client.ping()
        redis_proxy.cut()
        wait_for(lambda: redis_proxy.stats().active == 0, what="the cut")
        with pytest.raises(redis.ConnectionError):
            raw.send_command("PING")
            raw.read_response()
        assert client.ping() is True  # the pool notices the closed connection and reconnects
        assert redis_proxy.stats().mode == "pass"  # one-shot: new connections are forwarded as before
    finally:
        raw.disconnect()


# -- restore ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "reset", "blackhole", "delay"])
def test_restore_heals(fault: str, redis_proxy: FaultProxy, make_redis: Callable[..., redis.Redis]) -> None:
    client = make_redis(socket_timeout=0.3)
    client.ping()
    if fault == "delay":
        redis_proxy.delay(500)
    else:
        getattr(redis_proxy, fault)()
    with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
        make_redis(socket_timeout=0.3).ping()
    redis_proxy.restore()
    assert make_redis(socket_timeout=0.3).ping() is True
    client.set("faultproxy:healed", fault, ex=30)  # the old client recovers too, reconnecting if it must
    assert client.get("faultproxy:healed") == fault.encode()
    assert redis_proxy.stats().mode == "pass"


# -- lifecycle -------------------------------------------------------------------------------------


def test_stop_is_prompt_and_quiet_with_hung_connections(echo_port: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    proxy = FaultProxy("127.0.0.1", echo_port).start()
    hung = [socket.create_connection(proxy.address, timeout=2) for _ in range(3)]
    try:
        hung[0].sendall(b"a")
        assert hung[0].recv(1) == b"a"
        proxy.blackhole()
        hung.append(socket.create_connection(proxy.address, timeout=2))  # born in the blackhole
        proxy.delay(10_000)
        hung[1].sendall(b"held for ten seconds")  # in flight when we stop
        wait_for(lambda: proxy.stats().active == 4, what="four connections")
        assert timed(proxy.stop) < 1
        for sock in hung:  # every connection was closed, none left hanging
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        proxy.stop()  # idempotent
    finally:
        for sock in hung:
            sock.close()
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_start_reports_a_port_in_use() -> None:
    with FaultProxy("127.0.0.1", REDIS_PORT) as proxy, pytest.raises(OSError):
        FaultProxy("127.0.0.1", REDIS_PORT, listen_port=proxy.port).start()


def test_bad_delay_arguments_are_refused(echo_proxy: FaultProxy) -> None:
    with pytest.raises(ValueError):
        echo_proxy.delay(-1)
    with pytest.raises(ValueError):
        echo_proxy.delay(10, direction="sideways")  # type: ignore[arg-type]


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_control_endpoint_switches_modes(echo_port: int) -> None:
    command = [sys.executable, "-m", "tests.support.faultproxy", "--listen", "127.0.0.1:0"]
    command += ["--upstream", f"127.0.0.1:{echo_port}", "--control", "127.0.0.1:0"]
    # start_new_session: its own process group, so the finally can stop it (and only it) by pid.
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    ) as process:
        try:
            _drive_cli(process)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)


def _drive_cli(process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], 10)
    assert readable, "the CLI printed no ready line"
    ready = json.loads(process.stdout.readline())
    host, port = ready["listen"].rsplit(":", 1)
    listen, control = (host, int(port)), ready["control"]

    assert requests.get(f"{control}/stats", timeout=3).json()["mode"] == "pass"
    assert echo_round_trip(listen) == b"ping"

    reply = requests.post(f"{control}/mode", json={"mode": "delay", "ms": 100}, timeout=3)
    assert reply.status_code == 200 and reply.json()["mode"] == "delay"
    assert timed(lambda: echo_round_trip(listen)) >= 0.2

    assert requests.post(f"{control}/mode", json={"mode": "drop"}, timeout=3).json()["mode"] == "drop"
    try:
        assert echo_round_trip(listen) == b""
    except ConnectionResetError:
        pass

    assert requests.post(f"{control}/mode", json={"mode": "restore"}, timeout=3).json()["mode"] == "pass"
    assert echo_round_trip(listen) == b"ping"

    bad = requests.post(f"{control}/mode", json={"mode": "melt"}, timeout=3)
    assert bad.status_code == 400 and "melt" in bad.json()["error"]
    bad = requests.post(f"{control}/mode", json={"mode": "delay", "ms": 10, "direction": "up"}, timeout=3)
    assert bad.status_code == 400
    assert requests.get(f"{control}/nope", timeout=3).status_code == 404

    stats = requests.get(f"{control}/stats", timeout=3).json()
    assert stats["accepted"] == 4 and stats["bytes_upstream"] == stats["bytes_downstream"] == 12

    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=5) == 0  # SIGTERM is a clean shutdown, not a crash
    assert process.stderr is not None
    assert process.stderr.read() == b""
