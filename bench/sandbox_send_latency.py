"""The sandbox's send latency while it posts receipt callbacks: does callback load slow its API?

    .venv/bin/python bench/sandbox_send_latency.py [--rate 800] [--seconds 15] [--latency-ms 50]
                                                   [--in-process]

Three processes: the sandbox (run_sandbox, as `manage.py run_sandbox_provider` runs it; its
callbacks posted by its child process, or by itself with --in-process), a receiver answering 204
(tests.support.callback_sink) and this driver, which creates Twilio SMS at a fixed rate (open
loop: a slow answer does not slow the offered load), each bringing two callbacks. The provider's
configured latency is `--latency-ms`; a real provider's does not grow with its callback load.
Prints the sends' latency (p50, p95, p99), the callbacks posted, and the sandbox's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import time
from urllib.parse import urlencode

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.callback_bench import ACCOUNT_SID, AUTH_TOKEN, start, tree_cpu_seconds  # noqa: E402
from tests.support.processes import free_port  # noqa: E402

SANDBOX_MAIN = (
    "import sys; from providers.sandbox.app import SandboxConfig, run_sandbox; "
    "options = {'callback_process': False} if sys.argv[4] == 'in-process' else {}; "
    "run_sandbox('127.0.0.1', int(sys.argv[1]), SandboxConfig(sys.argv[2], sys.argv[3], seed=1, **options))"
)


def percentile(ordered: list[float], share: float) -> float:
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def drive(sandbox: str, sink: str, rate: float, seconds: float, latency_ms: float, pid: int) -> None:
    auth = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"}
    create = f"{sandbox}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    latencies: list[float] = []
    refused = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2000)) as session:
        await session.post(f"{sandbox}/_sandbox/reset", json={})
        await session.post(f"{sandbox}/_sandbox/faults", json={"provider": "twilio", "latency_ms": latency_ms})

        async def send(i: int) -> None:
            nonlocal refused
            form = {"To": "+14155550100", "From": "+15005550006", "Body": f"bench {i}"}
            form["StatusCallback"] = f"{sink}/webhooks/twilio/?message_id=m-{i}&token=m-{i}.1"
            began = time.monotonic()
            async with session.post(create, data=urlencode(form).encode(), headers=headers) as response:
                await response.read()
                refused += response.status != 201
            latencies.append((time.monotonic() - began) * 1000)

        cpu_before, started = tree_cpu_seconds(pid), time.monotonic()
        tasks = []
        total = int(rate * seconds)
        for i in range(total):
            # Open loop: each send starts on its own schedule, whatever the earlier ones took.
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(i)))
        await asyncio.gather(*tasks)
        sent_s = time.monotonic() - started
        async with session.get(f"{sandbox}/_sandbox/callbacks/summary") as response:
            during = (await response.json())["twilio"]["posted_ok"]
        cpu = tree_cpu_seconds(pid) - cpu_before
        for _ in range(600):
            async with session.get(f"{sandbox}/_sandbox/callbacks/summary") as response:
                counts = (await response.json())["twilio"]
            if not counts["pending"]:
                break
            await asyncio.sleep(0.1)
    ordered = sorted(latencies)
    print(f"{total} sends ({refused} refused) offered at {rate:.0f}/s, done in {sent_s:.1f} s")
    print(
        f"send latency ms (configured {latency_ms:.0f}): p50 {percentile(ordered, 0.5):.0f}, "
        f"p95 {percentile(ordered, 0.95):.0f}, p99 {percentile(ordered, 0.99):.0f}, max {ordered[-1]:.0f}"
    )
    print(f"callbacks posted while sending: {during} ({during / sent_s:,.0f}/s); in all: {counts}")
    print(f"sandbox CPU while sending: {cpu:.1f} s ({cpu / sent_s:.0%} of a core, its processes together)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=800, help="sends per second offered")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--in-process", action="store_true", help="callbacks posted by the sandbox's own process")
    args = parser.parse_args()
    sandbox_port, sink_port = free_port(), free_port()
    mode = "in-process" if args.in_process else "child"
    sandbox = start([sys.executable, "-c", SANDBOX_MAIN, str(sandbox_port), ACCOUNT_SID, AUTH_TOKEN, mode])
    sink = start([sys.executable, "-m", "tests.support.callback_sink", str(sink_port)])
    try:
        asyncio.run(
            drive(
                f"http://127.0.0.1:{sandbox_port}",
                f"http://127.0.0.1:{sink_port}",
                args.rate,
                args.seconds,
                args.latency_ms,
                sandbox.pid,
            )
        )
    finally:
        for process in (sandbox, sink):
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
