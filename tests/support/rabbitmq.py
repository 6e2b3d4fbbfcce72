"""A RabbitMQ node of a test's own: its own node name, ports, epmd, Erlang cookie and data directory,
started and stopped by pid. A test can restart it for real (its quorum queues survive in the data
directory, as on a production broker) without touching the machine's RabbitMQ on 5672."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import kombu
from kombu.transport.native_delayed_delivery import MAX_LEVEL, level_name

from tests.support.processes import ManagedProcess, free_port, wait_until

# Node start-up with 16 quorum queues and Celery's 28 delay queues: ~5 s here, more under load.
START_TIMEOUT_S = 90.0


def rabbitmq_scripts() -> tuple[Path, Path] | None:
    """The real rabbitmq-server and rabbitmqctl scripts, or None when RabbitMQ is not installed.

    Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the rabbitmq user (who cannot
    read a test's directory); the scripts beside it run the node as whoever starts them.
    """
    found = shutil.which("rabbitmq-server") or shutil.which("rabbitmq-server", path="/usr/sbin:/usr/lib/rabbitmq/bin")
    if found is None:
        return None
    server = Path(found).resolve()
    if server.name == "rabbitmq-script-wrapper":
        server = server.with_name("rabbitmq-server")
    ctl = server.with_name("rabbitmqctl")
    return (server, ctl) if server.exists() and ctl.exists() else None


class RabbitNode:
    """One RabbitMQ node under `base_dir` (data and logs), listening on 127.0.0.1 only."""

    def __init__(self, base_dir: Path, env: dict[str, str]):
        scripts = rabbitmq_scripts()
        if scripts is None:
            raise RuntimeError("RabbitMQ is not installed (Debian: apt-get install rabbitmq-server)")
        self.server, self.ctl = scripts
        self.dir = base_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"conductor-test-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        config = self.dir / "rabbitmq.conf"
        # No /etc/rabbitmq/rabbitmq.conf (its listener is the machine's 5672), no plugins (management).
        config.write_text("log.file.level = info\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **{key: value for key, value in env.items() if not key.startswith(("RABBITMQ_", "ERL_"))},
            "HOME": str(self.dir),  # its own Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_PID_FILE": str(self.dir / "rabbitmq.pid"),
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        self.epmd: ManagedProcess | None = None
        self.process: ManagedProcess | None = None
        self.starts = 0

    def start(self) -> RabbitNode:
        """Start the node (and its epmd, once) and wait until it takes AMQP connections."""
        if self.epmd is None or not self.epmd.alive():
            epmd = shutil.which("epmd") or "epmd"
            self.epmd = ManagedProcess(
                "rabbitmq-epmd", [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"], self.env, self.dir
            ).start()
        self.starts += 1
        self.process = ManagedProcess(f"rabbitmq-{self.starts}", [str(self.server)], self.env, self.dir).start()
        # The node opens its AMQP listener last ("Server startup complete" follows at once): a login
        # says what `rabbitmqctl await_startup` says, without booting an Erlang VM for the CLI.
        wait_until(self.answers, START_TIMEOUT_S, interval=0.25, what=f"RabbitMQ node {self.node}")
        return self

    def answers(self) -> bool:
        if self.process is None or not self.process.alive():
            raise RuntimeError(f"RabbitMQ exited:\n{self.log_text()}")
        with kombu.Connection(self.url, connect_timeout=1) as connection:
            connection.ensure_connection(max_retries=1)
        return True

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the node as an operator's restart does (SIGTERM: connections closed, queues synced)."""
        if self.process is not None:
            self.process.stop(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the node: a crash. Quorum queues keep what they confirmed (their write-ahead log)."""
        if self.process is not None:
            self.process.kill()

    def restart(self, *, crash: bool = False) -> None:
        self.kill() if crash else self.stop()
        self.start()

    def close(self) -> None:
        self.stop(timeout=30)
        if self.epmd is not None:
            self.epmd.stop()

    def rabbitmqctl(self, *args: str) -> str:
        done = subprocess.run(
            [str(self.ctl), "-n", self.node, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def queues(self) -> dict[str, dict]:
        """Every queue of the node's default vhost: {name: {"type": ..., "messages": ...}}."""
        listed = json.loads(self.rabbitmqctl("list_queues", "-q", "name", "type", "messages", "--formatter", "json"))
        return {queue["name"]: queue for queue in listed}

    def delayed(self) -> int:
        """Tasks waiting out a countdown in Celery's delay queues (native delayed delivery), read
        with passive declares: cheap enough to poll while a test runs."""
        with kombu.Connection(self.url, connect_timeout=2) as connection:
            channel = connection.channel()
            return sum(channel.queue_declare(level_name(n), passive=True).message_count for n in range(MAX_LEVEL + 1))

    def log_text(self) -> str:
        parts = [self.process.log_text()] if self.process else []
        parts += [path.read_text(errors="replace") for path in sorted((self.dir / "log").glob("*.log"))]
        return "\n".join(parts)
