"""conductor_project/kombu_fixes.py against a real redis-server killed under a kombu connection:
what a Celery worker does when Redis dies while it holds unacknowledged tasks (docs/operations.md,
"Broker restarts")."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import kombu
import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue, transport
from kombu.message import Message
from kombu.transport import virtual

from conductor_project import kombu_fixes
from tests.support.processes import ManagedProcess, free_port, wait_until


@pytest.fixture
def redis_server(tmp_path) -> Iterator[ManagedProcess]:
    """A redis-server of the test's own, on a free port, that the test may kill."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs redis-server (Debian: apt-get install redis-server)")
    port = free_port()
    process = ManagedProcess(
        "redis", [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {}, tmp_path
    ).start()
    process.port = port
    wait_until(lambda: redis.Redis(port=port).ping(), 10, what="redis-server")
    yield process
    process.kill()


@pytest.fixture
def unfixed(monkeypatch) -> None:
    """kombu as installed, without Conductor's fixes (for this test only)."""
    monkeypatch.setattr(virtual.Transport, "close_connection", virtual.Transport.close_connection.__wrapped__)
    redis_channel = transport.redis.Channel
    monkeypatch.setattr(redis_channel, "_connparams", redis_channel._connparams.__wrapped__)


def _worker_holding_a_task(port: int) -> tuple[Connection, Message]:
    """A connection set up as a Celery worker's: a task consumed and not acknowledged on the default
    channel with a BRPOP outstanding, and a fanout (remote control) queue on a channel of its own."""
    connection = Connection(f"redis://127.0.0.1:{port}/0")
    tasks = Queue("tasks", Exchange("tasks"), "tasks")
    with connection.Producer() as producer:
        producer.publish({"task": 1}, exchange=tasks.exchange, routing_key="tasks", declare=[tasks])
    held: list[Message] = []
    Consumer(connection.default_channel, [tasks], callbacks=[lambda body, message: held.append(message)]).consume()
    control = Queue("worker.pidbox", Exchange("pidbox", type="fanout"), auto_delete=True)
    Consumer(connection.channel(), [control], callbacks=[lambda body, message: None], no_ack=True).consume()
    wait_until(lambda: _drain(connection) or held, 10, interval=0, what="the task delivered")
    _drain(connection)  # sends the next BRPOP, which the dying server never answers
    assert connection.default_channel._in_poll and connection.default_channel.qos._delivered
    return connection, held[0]


def _drain(connection: Connection) -> None:
    try:
        connection.drain_events(timeout=0.05)
    except TimeoutError:
        pass


def _connection_lost(connection: Connection) -> None:
    """What Celery's consumer does once it sees the connection lost (on_connection_error_after_connected)."""
    connection.collect(socket_timeout=5)
    connection.close()


def test_installed_kombu_still_fails_without_the_fixes(redis_server, unfixed):
    """The day this fails, kombu fixed it upstream: drop conductor_project/kombu_fixes.py."""
    connection, _ = _worker_holding_a_task(redis_server.port)
    redis_server.kill()
    with pytest.raises(AttributeError, match="hostname"):
        _connection_lost(connection)


def test_a_worker_connection_survives_redis_dying_with_a_task_unacknowledged(redis_server):
    connection, message = _worker_holding_a_task(redis_server.port)
    task_channel, connection_errors = connection.default_channel, connection.connection_errors
    redis_server.kill()
    _connection_lost(connection)  # raised AttributeError('...hostname') before the fixes

    # Closed while its transport was still attached: its unacked task was offered back (the server
    # was gone, so Redis' own visibility timeout or Conductor's sweeper brings it back).
    assert task_channel.closed and task_channel.qos._delivered.restored
    # The task finishes afterwards: its ack fails as a lost connection, which Celery logs and survives.
    with pytest.raises(connection_errors):
        message.ack()


def test_the_fixes_were_written_for_the_installed_kombu():
    """After a kombu upgrade: compare virtual.Transport.close_connection with close_every_channel's
    copy, and run test_installed_kombu_still_fails_without_the_fixes, before moving this pin."""
    assert kombu.__version__ == kombu_fixes.VERIFIED_KOMBU


def test_the_fixes_are_installed_by_importing_the_celery_app():
    import conductor_project.celery  # noqa: F401

    assert getattr(virtual.Transport.close_connection, "_conductor_fixed", False)
    assert getattr(transport.redis.Channel._connparams, "_conductor_fixed", False)
    kombu_fixes.apply()  # twice is harmless
    assert not getattr(virtual.Transport.close_connection.__wrapped__, "_conductor_fixed", False)


def test_a_channel_of_a_closed_connection_raises_a_connection_error(redis_server):
    connection = Connection(f"redis://127.0.0.1:{redis_server.port}/0")
    channel, connection_errors = connection.channel(), connection.connection_errors
    connection.close()
    with pytest.raises(connection_errors, match="after its broker connection was closed"):
        channel._connparams()
