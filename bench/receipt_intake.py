"""Receipt intake alone: signed Twilio status callbacks posted as fast as the receiver takes them.

Issue 19's intake targets (>= 3,000 receipts/s, webhook p99 < 50 ms) measured on the receiver by
itself, in its own database (conductor_bench_intake, dropped and created again): `manage.py
receipt_intake` (the default, an asyncio server) or, with --web, gunicorn as the Procfile runs the
web (2 processes x 32 threads). One driver process posts --receipts distinct callbacks, each signed
as Twilio signs (HMAC-SHA1 over the URL and the fields), from --concurrency connections (the
sandbox keeps 256 in flight), and times each answer; at the end every receipt must be stored.
Nothing applies them here (bench/lifecycle.py runs the whole stack): the figures are the intake's.

Half the receipts go as fast as answered (the receiver's ceiling), half at --rate a second on a
fixed schedule (the latency a provider sees at that load).

Run: .venv/bin/python bench/receipt_intake.py [--receipts 30000] [--concurrency 256] [--rate 3000] [--web]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from _support import Figure, cpu_s, fresh_database, percentile, print_figures, stop_on_sigterm, write_json

DATABASE = "conductor_bench_intake"
BROKER_DB = 9  # the apply trigger publishes here; nobody consumes, flushed at the end (tests use 12-15)


def signed_callbacks(base_url: str, count: int) -> list[tuple[str, dict[str, str], dict[str, str]]]:
    from tests.support.signed_receipts import twilio_callback

    return [
        twilio_callback(base_url, message_id=str(uuid.uuid4()), sid=f"SM{uuid.uuid4().hex}", status="delivered")
        for _ in range(count)
    ]


async def post_all(
    base_url: str, callbacks, concurrency: int, rate: float | None = None
) -> tuple[list[float], dict[int, int], float]:
    """Post every callback over at most `concurrency` connections: as fast as answered (closed
    loop), or at `rate` a second on a fixed schedule (open loop: a callback's latency counts from
    when it was due, so a receiver falling behind shows as latency, not as a lower offered rate)."""
    import aiohttp

    latencies: list[float] = []
    codes: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def post(path: str, form: dict[str, str], headers: dict[str, str], due: float) -> None:
            async with session.post(base_url + path, data=form, headers=headers) as response:
                await response.read()
            latencies.append((time.perf_counter() - due) * 1000)
            codes[response.status] = codes.get(response.status, 0) + 1

        began = time.perf_counter()
        if rate is None:
            queue = iter(callbacks)

            async def poster() -> None:
                for path, form, headers in queue:
                    await post(path, form, headers, time.perf_counter())

            await asyncio.gather(*(poster() for _ in range(concurrency)))
        else:
            tasks = []
            for index, (path, form, headers) in enumerate(callbacks):
                due = began + index / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(post(path, form, headers, due)))
            await asyncio.gather(*tasks)
        return latencies, codes, time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=256, help="connections at most (the sandbox's 256)")
    parser.add_argument("--rate", type=float, default=3000.0, help="receipts/s offered in the open-loop half")
    parser.add_argument("--web", action="store_true", help="post to gunicorn (the web) instead of the intake")
    parser.add_argument("--processes", type=int, default=1, help="intake processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    stop_on_sigterm()

    fresh_database(DATABASE)
    import os

    import redis
    from django.conf import settings

    from messaging.models import Receipt
    from tests.support.processes import PYTHON, ManagedProcess, free_port, http_ok, wait_until

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "conductor_project.settings.base",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DATABASE}",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{BROKER_DB}",
        "REDIS_URL": f"redis://127.0.0.1:6379/{BROKER_DB}",
        "CONDUCTOR_PUBLIC_URL": base_url,
        "CONDUCTOR_RECEIPTS_URL": base_url,
        "LOG_FORMAT": "json",
    }
    if args.web:
        name = "gunicorn 2 x 32 threads"
        command = [PYTHON, "-m", "gunicorn", "conductor_project.wsgi", "-b", f"127.0.0.1:{port}", "-w", "2"]
        command += ["-k", "gthread", "--threads", "32", "--worker-connections", "200"]
    else:
        name = f"receipt_intake (asyncio) x {args.processes}"
        command = [PYTHON, "manage.py", "receipt_intake", "--port", str(port)]
    settings.CONDUCTOR = {**settings.CONDUCTOR, "PUBLIC_URL": base_url, "RECEIPTS_URL": base_url}
    callbacks = signed_callbacks(base_url, args.receipts)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-intake-"))
    count = 1 if args.web else args.processes
    servers = [ManagedProcess(f"receiver-{n}", command, env, log_dir).start() for n in range(count)]
    warm, half = 500, (args.receipts - 500) // 2
    try:
        if args.web:
            wait_until(lambda: http_ok(f"{base_url}/healthz"), 60, what=name)
        else:
            wait_until(lambda: all("listening" in server.log_text() for server in servers), 60, what=name)
        asyncio.run(post_all(base_url, callbacks[:warm], 32))  # warm up: connections, imports, caches
        cpu_before, driver_before = sum(cpu_s(server.pid) for server in servers), time.process_time()
        closed = asyncio.run(post_all(base_url, callbacks[warm : warm + half], args.concurrency))
        cpu_used, driver_used = (
            sum(cpu_s(server.pid) for server in servers) - cpu_before,
            time.process_time() - driver_before,
        )
        opened = asyncio.run(post_all(base_url, callbacks[warm + half :], args.concurrency, rate=args.rate))
    finally:
        for server in servers:
            server.stop()
        redis.Redis(db=BROKER_DB).flushdb()
    stored = Receipt.objects.count()
    answered = warm + sum(codes.get(204, 0) for _, codes, _ in (closed, opened))
    max_rate = len(closed[0]) / closed[2]
    offered_rate = len(opened[0]) / opened[2]
    p50, p95, p99 = (percentile(opened[0], share) for share in (0.50, 0.95, 0.99))
    c50, c99 = (percentile(closed[0], share) for share in (0.50, 0.99))
    for label, (latencies, codes, elapsed) in (("as fast as answered", closed), (f"at {args.rate:,.0f}/s", opened)):
        print(f"{name}, {label}: {len(latencies)} receipts in {elapsed:.1f} s, answers {codes}")
    figures = [
        Figure(
            "receipt_intake",
            f"receipts/s, {name}, as fast as answered ({args.concurrency} in flight)",
            f"{max_rate:,.0f} (p50 {c50:.0f} ms, p99 {c99:.0f} ms)",
            target=">= 3,000/s",
            verdict="PASS" if max_rate >= 3000 else "FAIL",
        ),
        Figure(
            "receipt_intake",
            f"webhook latency p50 / p95 / p99 at {args.rate:,.0f} receipts/s offered ({offered_rate:,.0f}/s taken)",
            f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms",
            target="p99 < 50 ms",
            verdict="PASS" if p99 < 50 and offered_rate >= 0.97 * args.rate else "FAIL",
        ),
        Figure(
            "receipt_intake",
            "CPU per receipt: receiver / driver (as fast as answered)",
            f"{cpu_used / half * 1000:.2f} / {driver_used / half * 1000:.2f} ms",
        ),
        Figure(
            "receipt_intake",
            "receipts answered 204 / stored",
            f"{answered:,} / {stored:,} of {args.receipts:,}",
            target="every one",
            verdict="PASS" if stored == answered == args.receipts else "FAIL",
        ),
    ]
    print_figures(figures)
    write_json(args.json, figures, {"receiver": name, "closed": closed[1:], "open": opened[1:]})


if __name__ == "__main__":
    main()
