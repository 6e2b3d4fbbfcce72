"""Several hosts on one machine: network namespaces on a bridge, and a PostgreSQL of their own.

`Hosts` makes a "server" namespace holding a bridge and one namespace per worker host, each
linked to the bridge by a veth pair, plus one veth end in the machine's own namespace (where
the test or bench process runs: it posts to the API and reads the sandbox over it). Every name
starts with cdt<pid>, the subnet comes from the pid too, and delete() removes everything it made
(namespaces, and with them their veth pairs). cut(host) sets that host's port on the bridge down:
its processes keep running and see their packets vanish, as a host whose cable or switch port
failed does; heal(host) sets it up again.

`ScratchPostgres` runs initdb into a temporary directory and a postgres server listening on one
address (the server namespace's) with trust authentication, as the `postgres` user (PostgreSQL
refuses to run as root), through the given command prefix (`ip netns exec <server>`). The
machine's own PostgreSQL listens on 127.0.0.1 only, so other hosts could not reach it.

Both use iproute2's `ip` and PostgreSQL's own binaries (the `postgresql` package); hosts_available()
says why a machine cannot run them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import ManagedProcess, wait_until

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), if any."""
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), key=lambda p: int(p.parent.name))
    return found[-1] if found else None


def hosts_available() -> str | None:
    """None when this process can make namespaces and run PostgreSQL in one; else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if postgres_bin() is None:
        return f"no PostgreSQL server binaries under {PG_BIN_GLOB}"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no `postgres` user to run a PostgreSQL server as"
    probe = f"cdt{os.getpid()}probe"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str  # the namespace
    address: str
    link: str  # its veth end, inside the namespace
    port: str  # the other end, on the server's bridge

    @property
    def prefix(self) -> list[str]:
        """Run a command on this host."""
        return ["ip", "netns", "exec", self.name]


class Hosts:
    """A server namespace with a bridge, `workers` worker namespaces, and this process's link to
    the bridge. Use as a context manager, or call delete() (safe to call twice, and after a
    failed create)."""

    def __init__(self, workers: int = 2):
        pid = os.getpid()
        self.tag = f"cdt{pid}"
        # 100.64.0.0/10 (shared address space): nothing on a test machine routes it; one /24 per pid.
        self.subnet = f"100.{64 + pid % 64}.{(pid // 64) % 256}"
        self.bridge = f"{self.tag}br"
        self.server = Host(f"{self.tag}srv", f"{self.subnet}.1", self.bridge, "")
        self.workers = [
            Host(f"{self.tag}w{n}", f"{self.subnet}.{10 + n}", f"{self.tag}w{n}", f"{self.tag}w{n}p")
            for n in range(1, workers + 1)
        ]
        # This process's end (the machine's own namespace): the operator's or the test's seat.
        self.local_link, self.local_port = f"{self.tag}t", f"{self.tag}tp"
        self.local_address = f"{self.subnet}.254"
        self._namespaces: list[str] = []

    def __enter__(self) -> Hosts:
        try:
            self.create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()

    def create(self) -> Hosts:
        server = self.server.name
        self._add_namespace(server)
        _ip("-n", server, "link", "set", "lo", "up")
        _ip("-n", server, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", server, "addr", "add", f"{self.server.address}/24", "dev", self.bridge)
        _ip("-n", server, "link", "set", self.bridge, "up")
        for host in self.workers:
            self._add_namespace(host.name)
            _ip("-n", host.name, "link", "set", "lo", "up")
            _ip(
                "link", "add", host.link, "netns", host.name, "type", "veth", "peer", "name", host.port, "netns", server
            )
            self._plug(host.port)
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.link)
            _ip("-n", host.name, "link", "set", host.link, "up")
        # Our own end stays here; its peer goes to the bridge. Deleting the server namespace
        # deletes the pair (delete() removes it by name too).
        _ip("link", "add", self.local_link, "type", "veth", "peer", "name", self.local_port, "netns", server)
        self._plug(self.local_port)
        _ip("addr", "add", f"{self.local_address}/24", "dev", self.local_link)
        _ip("link", "set", self.local_link, "up")
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def _plug(self, port: str) -> None:
        _ip("-n", self.server.name, "link", "set", port, "master", self.bridge)
        _ip("-n", self.server.name, "link", "set", port, "up")

    def cut(self, host: Host) -> None:
        """The host's switch port goes down: nothing it sends arrives, nothing reaches it."""
        _ip("-n", self.server.name, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        _ip("-n", self.server.name, "link", "set", host.port, "up")

    def delete(self) -> None:
        """Remove our link and every namespace made (their veth pairs go with them). Processes
        still running in a namespace keep it alive: stop them first."""
        _ip("link", "del", self.local_link, check=False)
        while self._namespaces:
            _ip("netns", "del", self._namespaces.pop(), check=False)


class ScratchPostgres:
    """A PostgreSQL server of its own: initdb into a temporary directory, listening on `host`,
    trust authentication, durability off (a test's data), run through `prefix`. stop() stops it
    (fast shutdown) and removes the directory."""

    def __init__(self, host: str, prefix: list[str], log_dir: Path, port: int = 5432):
        self.host, self.prefix, self.port, self.log_dir = host, prefix, port, log_dir
        self.bin = postgres_bin()
        self.data = Path(tempfile.mkdtemp(prefix="conductor-pg-"))
        self.process: ManagedProcess | None = None

    def url(self, database: str) -> str:
        return f"postgres://postgres@{self.host}:{self.port}/{database}"

    def start(self, databases: tuple[str, ...] = ()) -> ScratchPostgres:
        assert self.bin is not None
        account = pwd.getpwnam("postgres")
        os.chown(self.data, account.pw_uid, account.pw_gid)
        as_postgres = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--init-groups"]
        env = {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "HOME": str(self.data)}
        subprocess.run(
            [*as_postgres, str(self.bin / "initdb"), "-D", str(self.data / "db"), "-U", "postgres"]
            + ["-A", "trust", "-E", "UTF8", "--no-sync"],
            env=env,
            capture_output=True,
            check=True,
            timeout=120,
        )
        with open(self.data / "db" / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.host}/24 trust\n")
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.data),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        self.process = ManagedProcess(
            "postgres",
            [*self.prefix, *as_postgres, str(self.bin / "postgres"), "-D", str(self.data / "db"), *options],
            env,
            self.log_dir,
        ).start()
        wait_until(self._ready, 30, 0.1, what="postgres")
        for database in databases:
            self.execute(f"CREATE DATABASE {database}")
        return self

    def _ready(self) -> bool:
        import psycopg

        if self.process is not None and not self.process.alive():
            raise RuntimeError(f"postgres exited:\n{self.process.log_text()[-2000:]}")
        with psycopg.connect(self.url("postgres"), connect_timeout=1):
            return True

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(sql)

    def stop(self) -> None:
        if self.process is not None and self.process.alive():
            try:
                os.killpg(self.process.pid, signal.SIGINT)  # fast shutdown: disconnect everyone
                deadline = time.monotonic() + 10
                while self.process.alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
            except ProcessLookupError:
                pass
            self.process.stop()
        shutil.rmtree(self.data, ignore_errors=True)
