"""A client's callback endpoint with faults, as a process of its own (tests and benchmarks).

    python -m tests.support.callback_receiver --port P --admin-port A --record FILE --secret whsec_...
                                             [--secret ...] [--faults '{"error_rate": 0.3}']

Every POST to the callback port is verified with the Standard Webhooks reference library
(`standardwebhooks`, any of the given secrets), recorded as one JSON line in FILE (webhook-id,
the webhook headers, the body, verified or not, the answer given, the arrival time) and answered
according to the fault profile:

- `status` (200): the answer when no fault applies;
- `error_rate` / `error_status` (0 / 500): that share of requests gets that answer;
- `timeout_rate` / `hold_seconds` (0 / 30): that share is held that long before any answer (past
  the sender's timeout: recorded with answer "held");
- `latency_ms` (0): added before every answer;
- `fail_first` / `fail_first_status` (0 / 500): the first N requests of each webhook-id get that
  answer (deterministic retries), with `retry_after` (a Retry-After header value) if set;
- an outage (POST /outage {"seconds", "mode"}): "refuse" closes the listener and every open
  connection for that long (connection refused), "503" answers 503 (with `retry_after` if set).

The admin port (JSON): POST /faults (merged into the profile), POST /outage, POST /secrets
{"secrets": [...]}, POST /flush (the record file written out), POST /reset (records and counts
emptied), GET /summary (requests, by answer, unverified, distinct webhook-ids). Per request: one
HMAC per secret, one json.loads, one buffered write; the file is flushed every 20 ms.

ReceiverProcess / running_receiver start it from a test and stop it by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.support.processes import PYTHON, ManagedProcess, free_port, wait_until

DEFAULT_FAULTS: dict[str, Any] = {
    "status": 200,
    "error_rate": 0.0,
    "error_status": 500,
    "timeout_rate": 0.0,
    "hold_seconds": 30.0,
    "latency_ms": 0.0,
    "fail_first": 0,
    "fail_first_status": 500,
    "retry_after": None,
}
RECORDED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature", "content-type", "user-agent")


class Receiver:
    """The server's state: faults, secrets, counts, the record file."""

    def __init__(self, *, port: int, record: Path, secrets: list[str], faults: dict[str, Any], seed: int) -> None:
        self.port = port
        self.faults = {**DEFAULT_FAULTS, **faults}
        self.signers = [Webhook(secret) for secret in secrets]
        self.record_path = record
        self.record_file = open(record, "a", buffering=1 << 20)  # noqa: SIM115 - open for the process's life
        self.rng = random.Random(seed)
        self.attempts: Counter[str] = Counter()
        self.answers: Counter[str] = Counter()
        self.unverified = 0
        self.requests = 0
        self.outage_until = 0.0
        self.outage_mode = ""
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None

    # --- callbacks ----------------------------------------------------------------------------------
    async def take(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        arrived = time.time()
        headers = {name: request.headers.get(name, "") for name in RECORDED_HEADERS}
        webhook_id = headers["webhook-id"]
        verified, payload = self._verify(body, request.headers)
        self.requests += 1
        self.attempts[webhook_id] += 1
        answer, retry_after = self._decide(self.attempts[webhook_id], arrived)
        self.answers[str(answer)] += 1
        if not verified:
            self.unverified += 1
        record = {
            "webhook_id": webhook_id,
            "path": request.path,
            "headers": headers,
            "body": payload,
            "verified": verified,
            "answer": answer,
            "at": arrived,
        }
        self.record_file.write(json.dumps(record, separators=(",", ":")) + "\n")
        if self.faults["latency_ms"]:
            await asyncio.sleep(self.faults["latency_ms"] / 1000)
        if answer == "held":
            await asyncio.sleep(self.faults["hold_seconds"])
            return web.Response(status=200)
        extra = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return web.Response(status=answer, headers=extra)

    def _verify(self, body: bytes, headers: Any) -> tuple[bool, Any]:
        wanted = {name: headers.get(name, "") for name in ("webhook-id", "webhook-timestamp", "webhook-signature")}
        for signer in self.signers:
            try:
                return True, signer.verify(body, wanted)
            except WebhookVerificationError:
                continue
        try:
            return False, json.loads(body)
        except ValueError:
            return False, body.decode(errors="replace")

    def _decide(self, attempt: int, now: float) -> tuple[int | str, str | None]:
        faults = self.faults
        if now < self.outage_until and self.outage_mode == "503":
            return 503, faults["retry_after"]
        if attempt <= faults["fail_first"]:
            status = faults["fail_first_status"]
            return status, faults["retry_after"] if status in (429, 503) else None
        draw = self.rng.random()
        if draw < faults["timeout_rate"]:
            return "held", None
        if draw < faults["timeout_rate"] + faults["error_rate"]:
            status = faults["error_status"]
            return status, faults["retry_after"] if status in (429, 503) else None
        return faults["status"], None

    # --- the listener -------------------------------------------------------------------------------
    async def listen(self) -> None:
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True, backlog=1024)
        await self.site.start()

    async def refuse_for(self, seconds: float) -> None:
        """Connection refused for `seconds`: no listener, and every open connection dropped."""
        self.outage_until, self.outage_mode = time.time() + seconds, "refuse"
        if self.site is not None:
            await self.site.stop()
            self.site = None
        server = self.runner.server
        for transport in list(getattr(server, "_connections", {}).values()):
            transport.abort()
        await asyncio.sleep(seconds)
        await self.listen()

    # --- admin --------------------------------------------------------------------------------------
    async def set_faults(self, request: web.Request) -> web.Response:
        self.faults.update(await request.json())
        return web.json_response(self.faults)

    async def set_secrets(self, request: web.Request) -> web.Response:
        self.signers = [Webhook(secret) for secret in (await request.json())["secrets"]]
        return web.json_response({"secrets": len(self.signers)})

    async def outage(self, request: web.Request) -> web.Response:
        spec = await request.json()
        seconds, mode = float(spec["seconds"]), spec.get("mode", "refuse")
        if mode == "refuse":
            asyncio.get_running_loop().create_task(self.refuse_for(seconds))
        else:
            self.outage_until, self.outage_mode = time.time() + seconds, mode
        return web.json_response({"until": time.time() + seconds, "mode": mode})

    async def flush(self, request: web.Request) -> web.Response:
        self.record_file.flush()
        return web.json_response({"ok": True})

    async def reset(self, request: web.Request) -> web.Response:
        self.record_file.flush()
        self.record_file.truncate(0)
        self.attempts.clear()
        self.answers.clear()
        self.unverified = self.requests = 0
        return web.json_response({"ok": True})

    async def summary(self, request: web.Request) -> web.Response:
        self.record_file.flush()
        return web.json_response(
            {
                "requests": self.requests,
                "by_answer": dict(self.answers),
                "unverified": self.unverified,
                "distinct_webhook_ids": len(self.attempts),
                "listening": self.site is not None,
            }
        )

    async def flush_forever(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self.record_file.flush()


async def serve(receiver: Receiver, admin_port: int) -> None:
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/{tail:.*}", receiver.take)
    receiver.runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await receiver.runner.setup()
    await receiver.listen()
    admin = web.Application()
    admin.router.add_post("/faults", receiver.set_faults)
    admin.router.add_post("/secrets", receiver.set_secrets)
    admin.router.add_post("/outage", receiver.outage)
    admin.router.add_post("/flush", receiver.flush)
    admin.router.add_post("/reset", receiver.reset)
    admin.router.add_get("/summary", receiver.summary)
    admin_runner = web.AppRunner(admin, access_log=None)
    await admin_runner.setup()
    await web.TCPSite(admin_runner, "127.0.0.1", admin_port).start()
    print(f"callback receiver listening on {receiver.port}, admin on {admin_port}", flush=True)
    await receiver.flush_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--admin-port", type=int, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--secret", action="append", default=[])
    parser.add_argument("--faults", default="{}")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    receiver = Receiver(
        port=args.port, record=args.record, secrets=args.secret, faults=json.loads(args.faults), seed=args.seed
    )
    asyncio.run(serve(receiver, args.admin_port))


# --- from a test --------------------------------------------------------------------------------
class ReceiverProcess:
    """The receiver as a child process: start(), the admin calls, records(), stop() (by pid)."""

    def __init__(
        self, *, secrets: list[str], faults: dict[str, Any] | None = None, log_dir: Path | None = None
    ) -> None:
        self.secrets = secrets
        self.initial_faults = faults or {}
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="callback-receiver-"))
        self.port, self.admin_port = free_port(), free_port()
        self.record_path = self.log_dir / f"callbacks-{self.port}.jsonl"
        self.base = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        self.process: ManagedProcess | None = None

    def url(self, path: str = "/hook") -> str:
        return self.base + path

    def start(self) -> ReceiverProcess:
        args = [PYTHON, "-m", "tests.support.callback_receiver", "--port", str(self.port)]
        args += ["--admin-port", str(self.admin_port), "--record", str(self.record_path)]
        for secret in self.secrets:
            args += ["--secret", secret]
        args += ["--faults", json.dumps(self.initial_faults)]
        self.process = ManagedProcess(f"callback-receiver-{self.port}", args, _env(), self.log_dir).start()
        wait_until(lambda: self.summary() is not None, 20, interval=0.05, what="callback receiver")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def faults(self, **faults: Any) -> dict[str, Any]:
        return self._post("/faults", faults)

    def set_secrets(self, secrets: list[str]) -> None:
        self._post("/secrets", {"secrets": secrets})

    def outage(self, seconds: float, mode: str = "refuse") -> None:
        self._post("/outage", {"seconds": seconds, "mode": mode})

    def reset(self) -> None:
        self._post("/reset", {})

    def summary(self) -> dict[str, Any]:
        response = requests.get(f"{self.admin}/summary", timeout=5)
        response.raise_for_status()
        return response.json()

    def records(self) -> list[dict[str, Any]]:
        """Every request so far, in arrival order."""
        self._post("/flush", {})
        if not self.record_path.exists():
            return []
        lines = self.record_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = requests.post(f"{self.admin}{path}", json=payload, timeout=5)
        response.raise_for_status()
        return response.json()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@contextmanager
def running_receiver(*, secrets: list[str], faults: dict[str, Any] | None = None) -> Iterator[ReceiverProcess]:
    """A receiver process for the block; stopped by pid however the block ends."""
    receiver = ReceiverProcess(secrets=secrets, faults=faults)
    try:
        yield receiver.start()
    finally:
        receiver.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
