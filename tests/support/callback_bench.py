"""How many callbacks a second the sandbox posts while it answers sends (realistic mode).

    python -m tests.support.callback_bench [--messages 30000] [--channel sms|whatsapp] [--concurrency 64]
                                           [--sends-only]

Three processes: the sandbox (run_sandbox, as `manage.py run_sandbox_provider` runs it), a
receiver answering 204 (tests.support.callback_sink), and this driver, which creates Twilio
messages as fast as the sandbox answers them. An SMS brings two callbacks (sent, delivered), a
WhatsApp message read three. Prints sends/s, callbacks/s, the sandbox's CPU per callback and the
callback counters (which must show nothing given up). --sends-only leaves the callback URL out:
what sending alone costs, to tell what a callback costs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
from urllib.parse import urlencode

import aiohttp

from tests.support.processes import REPO, free_port

ACCOUNT_SID = "AC" + "b" * 32
AUTH_TOKEN = "bench-token"
SANDBOX_MAIN = (
    "import sys; from providers.sandbox.app import SandboxConfig, run_sandbox; "
    "run_sandbox('127.0.0.1', int(sys.argv[1]), SandboxConfig(sys.argv[2], sys.argv[3], seed=1))"
)


def start(args: list[str]) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening" not in line:
        raise RuntimeError(f"{args[:3]} did not start: {line}{process.stdout.read()}")
    return process


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as listing:
            found += [int(child) for child in listing.read().split()]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (the sandbox and its callback process)."""
    return sum(cpu_seconds(each) for each in (pid, *children(pid)))


async def drive(
    sandbox: str, sink: str, messages: int, concurrency: int, channel: str, pid: int, callbacks: bool = True
) -> None:
    auth = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    headers = {"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"}
    create = f"{sandbox}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    to = "whatsapp:+14155550100" if channel == "whatsapp" else "+14155550100"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await session.post(f"{sandbox}/_sandbox/reset", json={})
        faults = {"provider": "twilio", "receipt_status": "read" if channel == "whatsapp" else "delivered"}
        await session.post(f"{sandbox}/_sandbox/faults", json=faults)
        next_index = iter(range(messages))
        refused = 0

        async def sender() -> None:
            nonlocal refused
            for i in next_index:
                form = {"To": to, "From": "+15005550006", "Body": f"bench {i}"}
                if callbacks:
                    form["StatusCallback"] = f"{sink}/webhooks/twilio/?message_id=m-{i}&token=m-{i}.1"
                async with session.post(create, data=urlencode(form).encode(), headers=headers) as response:
                    await response.read()
                    refused += response.status != 201

        async def counters() -> dict[str, int]:
            async with session.get(f"{sandbox}/_sandbox/callbacks/summary") as response:
                return (await response.json())["twilio"]

        cpu_before, started = tree_cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(sender() for _ in range(concurrency)))
        sent_s = time.monotonic() - started
        while (counts := await counters())["pending"]:
            await asyncio.sleep(0.05)
        total_s = time.monotonic() - started
        cpu = tree_cpu_seconds(pid) - cpu_before
        async with session.get(f"{sink}/count") as response:
            received = (await response.json())["received"]
    posted = counts["posted_ok"]
    print(f"{messages} {channel} messages ({refused} refused) sent in {sent_s:.1f} s: {messages / sent_s:,.0f} sends/s")
    print(f"{posted} callbacks posted in {total_s:.1f} s: {posted / total_s:,.0f} callbacks/s (received {received})")
    print(
        f"sandbox CPU {cpu:.1f} s ({cpu / total_s:.0%} of a core): "
        f"{cpu / (messages + posted) * 1e6:.0f} us per send or callback"
    )
    print("counters:", counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--channel", choices=("sms", "whatsapp"), default="sms")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sends-only", action="store_true", help="no callback URL: the cost of sends alone")
    args = parser.parse_args()
    sandbox_port, sink_port = free_port(), free_port()
    sandbox = start([sys.executable, "-c", SANDBOX_MAIN, str(sandbox_port), ACCOUNT_SID, AUTH_TOKEN])
    sink = start([sys.executable, "-m", "tests.support.callback_sink", str(sink_port)])
    try:
        asyncio.run(
            drive(
                f"http://127.0.0.1:{sandbox_port}",
                f"http://127.0.0.1:{sink_port}",
                args.messages,
                args.concurrency,
                args.channel,
                sandbox.pid,
                not args.sends_only,
            )
        )
    finally:
        for process in (sandbox, sink):
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
