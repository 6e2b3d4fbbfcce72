"""The PostgreSQL `make run` runs itself when there is no DATABASE_URL (SPEC §1's embedded default).

Not SQLite: the send path's SQL is PostgreSQL's (fair bulk picks, callback deliveries and receipt
batches lock rows FOR UPDATE SKIP LOCKED, rows_update writes a batch's outcomes with one UPDATE ...
FROM jsonb_to_recordset(...), the sweep takes pg_try_advisory_lock), so on SQLite nothing is sent. The `pgserver` wheel
ships PostgreSQL's own binaries (16.x, for Python 3.11 on Linux and macOS): the stack initialises
a cluster in var/postgres once, then runs `postgres` in the foreground as a supervisord program,
like the local Redis: restarted if it dies, stopped (fast shutdown) after every process that uses
it. Only pgserver's binaries are used, not its get_server(): that one daemonises through pg_ctl
(nothing would restart it, a crashed `make run` would leave it running) and, as root, adds a
system user and opens every parent directory of the data to all users.

It listens on 127.0.0.1 only, on CONDUCTOR_EMBEDDED_DB_PORT (5433 by default, beside a local
PostgreSQL's 5432), no Unix socket (a socket's path has a length limit a deep CONDUCTOR_VAR_DIR
would pass), user `postgres` with trust authentication: a development database, as the SQLite
file it replaces was. PostgreSQL refuses to run as root: then the server runs as `nobody`,
which owns var/postgres and must be able to reach it and the virtualenv (run_stack checks).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from messaging.local_stack import LocalStackError, Program

SERVER_USER_WHEN_ROOT = "nobody"
SUPERUSER = "postgres"
# The stack's processes hold up to ~90 connections at peak (gunicorn's 64 threads among them);
# PostgreSQL's default of 100 leaves too little room for a psql or `make demo` beside them.
MAX_CONNECTIONS = 200


@dataclass(frozen=True)
class LocalPostgres:
    data_dir: Path
    port: int
    database: str
    bin_dir: Path
    user: str | None  # the system user the server runs as; None: this process's

    @property
    def program_name(self) -> str:
        return "postgres"

    @property
    def source(self) -> str:
        """ "PostgreSQL 16.2 (pgserver 0.1.4)", for make run's first screen."""
        done = subprocess.run([str(self.bin_dir / "postgres"), "--version"], capture_output=True, text=True)
        version = done.stdout.split()[-1] if done.returncode == 0 and done.stdout.strip() else "?"
        return f"PostgreSQL {version} (pgserver {importlib.metadata.version('pgserver')})"

    def conninfo(self, database: str | None = None) -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database or self.database}"


def local_postgres(data_dir: Path, port: int, database: str) -> LocalPostgres:
    """The embedded server's description: pgserver's binaries, and who runs them."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise LocalStackError(
            "There is no DATABASE_URL and pgserver (the embedded PostgreSQL) is not installed: "
            "pip install -r requirements.txt -c constraints.txt, or set DATABASE_URL."
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    user = SERVER_USER_WHEN_ROOT if os.geteuid() == 0 else None
    if user is not None and not _reachable(user, bin_dir / "postgres"):
        bin_dir = _shared_copy(bin_dir.parent) / "bin"
    return LocalPostgres(data_dir, port, database, bin_dir, user)


def _shared_copy(install: Path) -> Path:
    """pgserver's PostgreSQL install copied where `nobody` can run it (once per version): as root
    in a checkout `nobody` cannot enter (under /root, a CI runner's home), the wheel's own copy is
    out of the server's reach. Its binaries find their libraries at $ORIGIN/../../../pgserver.libs,
    so the wheel's layout is kept. Copied under a temporary name and renamed: a concurrent make run
    never sees half a copy. Returns the copy's pginstall directory."""
    target = Path(tempfile.gettempdir()) / f"conductor-pgserver-{importlib.metadata.version('pgserver')}"
    if not (target / "pgserver" / "pginstall" / "bin" / "postgres").exists():
        partial = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=target.parent))
        shutil.copytree(install, partial / "pgserver" / "pginstall", symlinks=True)
        libs = install.parent.parent / "pgserver.libs"
        if libs.is_dir():
            shutil.copytree(libs, partial / "pgserver.libs", symlinks=True)
        for path in [partial, *partial.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
        try:
            partial.rename(target)
        except OSError:  # another make run copied it first
            shutil.rmtree(partial, ignore_errors=True)
    return target / "pgserver" / "pginstall"


def _reachable(user: str, path: Path) -> bool:
    """Whether `user` can enter every directory on the way to `path`."""
    dirs = [str(parent) for parent in reversed(path.resolve().parents)]
    script = 'for d in "$@"; do test -x "$d" || exit 1; done'
    return subprocess.run(["/bin/sh", "-c", script, "sh", *dirs], **_as_user(user)).returncode == 0


def prepare(server: LocalPostgres, cwd: Path) -> bool:
    """Make the data directory ready for `postgres` (initdb the first time: True) and check that
    the server can start: its port free, its files and `cwd` (supervisord's directory for it)
    reachable by the user it runs as."""
    if _port_answers(server.port):
        raise LocalStackError(
            f"Something already listens on 127.0.0.1:{server.port}, where make run starts its PostgreSQL "
            "(another make run?): stop it, set CONDUCTOR_EMBEDDED_DB_PORT to a free port, or set DATABASE_URL."
        )
    server.data_dir.mkdir(parents=True, exist_ok=True)
    if server.user is not None:
        entry = pwd.getpwnam(server.user)
        if not (server.data_dir / "PG_VERSION").exists():
            os.chown(server.data_dir, entry.pw_uid, entry.pw_gid)
        _check_reachable(server, [server.bin_dir / "postgres", server.data_dir])
    owner = server.data_dir.stat().st_uid
    runs_as = pwd.getpwnam(server.user).pw_uid if server.user else os.geteuid()
    if owner != runs_as:
        raise LocalStackError(
            f"{server.data_dir} belongs to uid {owner}, PostgreSQL would run as uid {runs_as} and refuses to "
            "use it: run make run as its owner, or remove the directory (the embedded database with it)."
        )
    if (server.data_dir / "PG_VERSION").exists():
        return False
    # --no-sync: a cluster just created needs no fsync of its 1,000 files (seconds on a slow
    # disk); the server itself syncs as usual. C locale: the same on every machine.
    args = [str(server.bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SUPERUSER, "--auth=trust"]
    args += ["--encoding=UTF8", "--no-locale", "--no-sync"]
    done = subprocess.run(args, capture_output=True, text=True, **_as_user(server.user))
    if done.returncode != 0:
        raise LocalStackError(f"initdb failed ({shlex.join(args)}):\n{done.stdout}{done.stderr}")
    return True


def program(server: LocalPostgres) -> Program:
    """`postgres` in the foreground, stopped with its fast shutdown (SIGINT: clients are
    disconnected, the data written out), before the stack's output listener and after the rest."""
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": str(server.port),
        "unix_socket_directories": "",
        "max_connections": str(MAX_CONNECTIONS),
        "log_checkpoints": "off",  # one line every 5 minutes on make run's terminal otherwise
    }
    args = [str(server.bin_dir / "postgres"), "-D", str(server.data_dir)]
    for name, value in settings.items():
        args += ["-c", f"{name}={value}"]
    # Runs in / : the checkout may be a directory its user cannot enter (root's home).
    return Program(server.program_name, shlex.join(args), priority=5, user=server.user, stopsignal="INT", directory="/")


def create_database(server: LocalPostgres, timeout: float) -> bool:
    """Wait until the server accepts connections, then create the stack's database if it is
    missing (True: created)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = psycopg.connect(server.conninfo("postgres"), autocommit=True, connect_timeout=2)
            break
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                raise LocalStackError(f"PostgreSQL on 127.0.0.1:{server.port} not answering: {exc}") from exc
            time.sleep(0.2)
    with admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [server.database]).fetchone():
            return False
        admin.execute(f'CREATE DATABASE "{server.database}"')
        return True


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _as_user(user: str | None) -> dict:
    """subprocess arguments that run a command as `user` (no supplementary groups of ours)."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": "/"}


def _check_reachable(server: LocalPostgres, paths: list[Path]) -> None:
    """As the server's user: every directory on the way to each path can be entered. (A checkout
    under /root is not, for `nobody`.)"""
    dirs = []
    for path in paths:
        dirs += [str(parent) for parent in reversed(path.resolve().parents)] + [str(path.resolve())]
    dirs = [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]
    script = 'for d in "$@"; do test -x "$d" || { echo "$d"; exit 1; }; done'
    args = ["/bin/sh", "-c", script, "sh", *dirs]
    done = subprocess.run(args, capture_output=True, text=True, **_as_user(server.user))
    if done.returncode != 0:
        raise LocalStackError(
            f"PostgreSQL refuses to run as root, so make run runs it as `{server.user}`, who cannot enter "
            f"{done.stdout.strip() or '?'}: run make run as another user, or let others enter that "
            f"directory (chmod o+x), or set CONDUCTOR_VAR_DIR elsewhere, or set DATABASE_URL."
        )
