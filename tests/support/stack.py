"""The whole Conductor stack as real processes: sandbox provider, web (gunicorn), Celery worker(s), beat."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import requests

from tests.support.processes import PYTHON, ManagedProcess, free_port, http_ok, wait_until
from tests.support.rabbitmq import RabbitNode


class Stack:
    """`host` is the address every server of the stack binds and every process is given, and
    `prefix` the command its processes start through: by default the machine's loopback and no
    prefix; tests/support/netns.py's hosts give a network namespace's address and `ip netns exec`
    (and env["DATABASE_URL"] a PostgreSQL of their own), and start_worker(prefix=...) puts a
    worker on another host. `broker`: "redis" (the stack's Redis, db 0) or "rabbitmq" (a RabbitMQ
    node of the stack's own, tests/support/rabbitmq.py); either way circuits and rate limits live
    in its Redis (db 1)."""

    def __init__(
        self,
        database_name: str,
        broker: str = "redis",
        *,
        host: str = "127.0.0.1",
        prefix: Sequence[str] = (),
    ):
        self.log_dir = Path(tempfile.mkdtemp(prefix="conductor-stack-"))
        self.host, self.prefix = host, list(prefix)
        self.web_port, self.sandbox_port, self.redis_port = free_port(), free_port(), free_port()
        self.intake_port = free_port()
        # A Redis (and a RabbitMQ) of the stack's own, so a test can restart it (which empties a
        # Redis) without touching anything else on the machine.
        self.rabbit = RabbitNode(self.log_dir / "rabbitmq", dict(os.environ)) if broker == "rabbitmq" else None
        self.broker_url = self.rabbit.url if self.rabbit else f"redis://{host}:{self.redis_port}/0"
        self.redis_url = f"redis://{host}:{self.redis_port}/1"
        self.web_url = f"http://{host}:{self.web_port}"
        # The receipt intake server: where the sandbox posts receipts, as providers do in production.
        self.receipts_url = f"http://{host}:{self.intake_port}"
        self.intake_processes = 1  # the Procfile runs 2 (one per core); tests need no more than 1
        # Every process of the stack writes its event metrics here; the web's /metrics sums them.
        self.metrics_dir = self.log_dir / "prometheus"
        self.metrics_dir.mkdir()
        self.sandbox_url = f"http://{host}:{self.sandbox_port}"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "conductor_project.settings.test",
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{database_name}",
            "CELERY_BROKER_URL": self.broker_url,
            "REDIS_URL": self.redis_url,
            "CONDUCTOR_PUBLIC_URL": self.web_url,
            "CONDUCTOR_RECEIPTS_URL": self.receipts_url,
            "CONDUCTOR_SANDBOX_URL": self.sandbox_url,
            "CELERY_BEAT_SCHEDULER": "celery.beat:PersistentScheduler",
            "CONDUCTOR_SWEEP_INTERVAL_SECONDS": "1",
            "CONDUCTOR_CIRCUIT_OPEN_SECONDS": "5",
            # Anomaly detection every second (with the default minute buckets it finds nothing
            # in a short test; the alert test gives its workers second-scale windows).
            "CONDUCTOR_ANOMALY_INTERVAL_SECONDS": "1",
            # A test that stops workers or loads them for a minute must not see a periodic job's
            # overdue alert among its own (tests/integration/test_beat_heartbeats.py sets its own).
            "CONDUCTOR_PERIODIC_JOB_OVERDUE_GRACE_SECONDS": "3600",
            "PYTHONUNBUFFERED": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
            "LOG_FORMAT": "json",
        }
        if host != "127.0.0.1":  # the web answers requests for its own address too
            self.env["ALLOWED_HOSTS"] = f"{host},127.0.0.1,localhost,testserver"
        self.processes: list[ManagedProcess] = []
        self.workers: list[ManagedProcess] = []
        # What replace_workers last started: (count, concurrency, env); the live fixture keeps
        # workers that already match what the next test asks for.
        self.worker_setup: tuple[int, int, tuple[tuple[str, str], ...]] = (1, 4, ())
        self.worker_env: dict[str, str] | None = None
        self._worker_seq = 0
        self._starting = ThreadPoolExecutor(8, "worker-start")

    # --- processes ------------------------------------------------------------------------------
    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, prefix: Sequence[str] | None = None
    ) -> ManagedProcess:
        """Start `args` through `prefix` (default: the stack's own, where its servers run)."""
        command = [*(self.prefix if prefix is None else prefix), *args]
        process = ManagedProcess(name, command, {**self.env, **(env or {})}, self.log_dir).start()
        self.processes.append(process)
        return process

    def start_redis(self) -> ManagedProcess:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("integration tests need redis-server (Debian: apt-get install redis-server)")
        self.redis = self._spawn(
            "redis",
            [server, "--port", str(self.redis_port), "--bind", self.host, "--save", "", "--appendonly", "no"]
            # Protected mode refuses every address but loopback when there is no password.
            + ["--protected-mode", "no"],
        )
        wait_until(lambda: redis.Redis(host=self.host, port=self.redis_port).ping(), 15, what="redis")
        return self.redis

    def restart_redis(self) -> None:
        """Kill Redis and start it again, empty: the broker loses every queued task."""
        self.redis.kill()
        self.processes.remove(self.redis)
        self.start_redis()

    def restart_broker(self, *, crash: bool = False) -> None:
        """Restart the broker: RabbitMQ stopped as an operator would (or SIGKILLed, `crash`) and
        started on the same data directory, its quorum queues kept; a Redis broker comes back empty."""
        if self.rabbit is None:
            self.restart_redis()
        else:
            self.rabbit.restart(crash=crash)

    def state_redis(self) -> redis.Redis:
        """The Redis holding circuit and rate-limit state, as the workers see it."""
        return redis.Redis.from_url(self.redis_url)

    def start(self, workers: int = 1) -> Stack:
        self.start_redis()
        if self.rabbit is not None:
            self.rabbit.start()
        self.sandbox = self._spawn(
            "sandbox",
            [PYTHON, "manage.py", "run_sandbox_provider", "--host", self.host, "--port", str(self.sandbox_port)]
            + ["--seed", "7"],
        )
        self.start_web()
        intake = [PYTHON, "manage.py", "receipt_intake", "--host", self.host, "--port", str(self.intake_port)]
        self.intake = self._spawn("intake", [*intake, "--processes", str(self.intake_processes)])
        self.start_beat()
        wait_until(lambda: http_ok(f"{self.sandbox_url}/_sandbox/healthz"), 30, what="sandbox")
        wait_until(lambda: http_ok(f"{self.web_url}/healthz"), 30, what="web")
        wait_until(
            lambda: self.intake.log_text().count("listening") == self.intake_processes, 30, what="receipt intake"
        )
        for _ in range(workers):
            self.start_worker()
        return self

    def start_web(self) -> ManagedProcess:
        """gunicorn as the Procfile runs it (not waited for: http_ok on /healthz says when it answers)."""
        self.web = self._spawn(
            "web",
            [
                PYTHON,
                "-m",
                "gunicorn",
                "conductor_project.wsgi",
                "-b",
                f"{self.host}:{self.web_port}",
                "-w",
                "2",
                "-k",
                "gthread",
                "--threads",
                "32",  # as the Procfile: receipt webhooks wait on a shared write, many at once
                # As the Procfile: a burst of new connections (a provider's callbacks) would
                # otherwise all be accepted by the one worker that wakes first.
                "--worker-connections",
                "200",
                "--graceful-timeout",
                "2",
            ],
        )
        return self.web

    def start_beat(self) -> ManagedProcess:
        """Celery beat, on a schedule file kept across restarts (as a deployment's would be)."""
        self.beat = self._spawn(
            "beat",
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "conductor_project",
                "beat",
                "-l",
                "info",
                "-s",
                str(self.log_dir / "celerybeat-schedule"),
            ],
        )
        return self.beat

    def stop_beat(self, kill: bool = False) -> None:
        """Stop beat by its pid: SIGKILL (a crash, no goodbye) or SIGTERM; start_beat starts it again."""
        if kill:
            self.beat.kill()
        else:
            self.beat.stop()
        if self.beat in self.processes:
            self.processes.remove(self.beat)

    def start_worker(
        self,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        queues: str | None = None,
        prefix: Sequence[str] | None = None,
    ) -> ManagedProcess:
        """A worker consuming every queue (or `queues`, comma-separated); `env` overrides settings
        for it alone (e.g. routes); `prefix` starts it elsewhere (another host's `ip netns exec`)."""
        worker = self._spawn_worker(concurrency, env, queues, prefix)
        self._wait_ready(worker)
        return worker

    def start_worker_in_background(
        self,
        concurrency: int = 4,
        env: dict[str, str] | None = None,
        queues: str | None = None,
        prefix: Sequence[str] | None = None,
    ) -> Future:
        """start_worker without waiting: the worker joins `workers` once ready (the Future says when)."""
        worker = self._spawn_worker(concurrency, env, queues, prefix)
        return self._starting.submit(self._wait_ready, worker)

    def _wait_ready(self, worker: ManagedProcess) -> None:
        wait_until(lambda: " ready." in worker.log_text(), 60, what=f"{worker.name} ready")
        self.workers.append(worker)

    def _spawn_worker(
        self,
        concurrency: int,
        env: dict[str, str] | None,
        queues: str | None = None,
        prefix: Sequence[str] | None = None,
    ) -> ManagedProcess:
        self._worker_seq += 1
        name = f"worker{self._worker_seq}"
        worker = self._spawn(
            name,
            [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "conductor_project",
                "worker",
                "-l",
                "info",
                "-n",
                f"{name}@%h",
                "-c",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                *(["-Q", queues] if queues else []),
            ],
            env,
            prefix,
        )
        return worker

    def workers_are(self, count: int, concurrency: int) -> bool:
        """Whether exactly `count` workers of the default settings and this concurrency run."""
        return (
            self.worker_setup == (count, concurrency, ())
            and len(self.workers) == count
            and all(worker.alive() for worker in self.workers)
        )

    def kill_worker(self, worker: ManagedProcess) -> None:
        worker.kill()
        self.workers.remove(worker)

    def replace_workers(
        self, env: dict[str, str] | None = None, count: int = 1, concurrency: int = 4
    ) -> list[ManagedProcess]:
        """Stop every worker and start `count` new ones (with `env` overrides, undone by the next test)."""
        self.worker_setup = (count, concurrency, tuple(sorted((env or {}).items())))
        # All at once, stopping and starting: a worker's start is mostly imports, seconds each.
        with ThreadPoolExecutor(max(1, len(self.workers))) as pool:
            list(pool.map(lambda worker: worker.stop(), self.workers))
        self.workers.clear()
        self.worker_env = env
        started = [self._spawn_worker(concurrency, env) for _ in range(count)]
        for worker in started:
            self._wait_ready(worker)
        return started

    def stop(self) -> None:
        self._starting.shutdown(wait=False, cancel_futures=True)
        for process in reversed(self.processes):
            process.stop()
        if self.rabbit is not None:
            self.rabbit.close()

    def logs(self) -> str:
        logs = "\n".join(f"===== {p.name} =====\n{p.log_text()[-5000:]}" for p in self.processes)
        return logs + (f"\n===== rabbitmq =====\n{self.rabbit.log_text()[-5000:]}" if self.rabbit else "")

    # --- the sandbox's control API -------------------------------------------------------------
    def sandbox_reset(self) -> None:
        requests.post(f"{self.sandbox_url}/_sandbox/reset", json={}, timeout=5).raise_for_status()

    def sandbox_faults(self, provider: str = "twilio", **faults: Any) -> dict[str, Any]:
        response = requests.post(
            f"{self.sandbox_url}/_sandbox/faults", json={"provider": provider, **faults}, timeout=5
        )
        response.raise_for_status()
        return response.json()

    def sandbox_callback_summary(self) -> dict[str, Any]:
        """The sandbox's callback counters per provider and in total (scheduled, posted_ok,
        given_up, pending...) and the callbacks' latency."""
        response = requests.get(f"{self.sandbox_url}/_sandbox/callbacks/summary", timeout=10)
        response.raise_for_status()
        return response.json()

    def sandbox_requests(self, **filters: Any) -> list[dict[str, Any]]:
        response = requests.get(f"{self.sandbox_url}/_sandbox/requests", params=filters, timeout=10)
        response.raise_for_status()
        return response.json()["requests"]

    # --- the API ------------------------------------------------------------------------------
    def api(self, key: str) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        return session
