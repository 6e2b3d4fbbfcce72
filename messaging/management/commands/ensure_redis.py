"""manage.py ensure_redis: make sure the Redis that settings point at answers, starting a local one if needed."""

from __future__ import annotations

import shutil
import subprocess
import time
from urllib.parse import urlparse

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


class Command(BaseCommand):
    help = (
        "Check that Redis (REDIS_URL and a redis:// CELERY_BROKER_URL) answers. If a local one does not "
        "and Debian's redis-server is installed, start it (no persistence, files under var/)."
    )

    def handle(self, *args, **options):
        urls = {settings.REDIS_URL}
        if settings.CELERY_BROKER_URL.startswith("redis"):
            urls.add(settings.CELERY_BROKER_URL)
        for url in sorted(urls):
            if _answers(url):
                self.stdout.write(f"Redis answers at {url}")
                continue
            parsed = urlparse(url)
            if parsed.hostname not in LOCAL_HOSTS:
                raise CommandError(f"Redis at {url} does not answer. Start it, or set REDIS_URL/CELERY_BROKER_URL.")
            self._start_local(parsed.port or 6379)
            if not _answers(url):
                raise CommandError(f"Started redis-server but {url} still does not answer; see var/redis.log.")
            self.stdout.write(self.style.SUCCESS(f"Started a local Redis on port {parsed.port or 6379}"))

    def _start_local(self, port: int) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise CommandError(
                "No Redis answers on 127.0.0.1 and redis-server is not installed. Install it "
                "(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) "
                "or point REDIS_URL and CELERY_BROKER_URL at a running Redis."
            )
        var_dir = settings.VAR_DIR
        var_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                server,
                "--daemonize",
                "yes",
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(var_dir),
                "--logfile",
                str(var_dir / "redis.log"),
                "--pidfile",
                str(var_dir / "redis.pid"),
            ],
            check=True,
        )
        for _ in range(40):
            if _answers(f"redis://127.0.0.1:{port}/0"):
                return
            time.sleep(0.25)
