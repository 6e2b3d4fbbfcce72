"""The sandbox's callback process: callbacks posted by a child, reset across it, no child left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from providers.sandbox.app import BackgroundSandbox, SandboxConfig, start_background
from tests.support.processes import REPO, free_port
from tests.support.webhook_receiver import WebhookReceiver

ACCOUNT_SID = "AC" + "7" * 32
AUTH_TOKEN = "poster-test-token"
FROM = "+15005550006"
# A send's answer while the callback process cannot run at all: the configured latency is 0, so
# this only has to absorb a busy shared machine.
SEND_BOUND_S = 2.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[BackgroundSandbox]:
    server = start_background(SandboxConfig(ACCOUNT_SID, AUTH_TOKEN, seed=11))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as rec:
        yield rec


@pytest.fixture(autouse=True)
def clean_sandbox(sandbox: BackgroundSandbox, receiver: WebhookReceiver) -> None:
    assert requests.post(f"{sandbox.url}/_sandbox/reset", json={}, timeout=10).json() == {"ok": True}
    receiver.clear()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def send(sandbox_url: str, receiver: WebhookReceiver, message_id: str) -> requests.Response:
    return requests.post(
        f"{sandbox_url}/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json",
        data={
            "To": "+15551230001",
            "From": FROM,
            "Body": f"body of {message_id}",
            "StatusCallback": f"{receiver.base}/webhooks/twilio/status?message_id={message_id}&token=t",
        },
        auth=(ACCOUNT_SID, AUTH_TOKEN),
        timeout=10,
    )


def set_faults(sandbox_url: str, **faults: Any) -> None:
    response = requests.post(f"{sandbox_url}/_sandbox/faults", json={"provider": "twilio", **faults}, timeout=10)
    assert response.status_code == 200, response.text


def summary(sandbox_url: str) -> dict[str, Any]:
    return requests.get(f"{sandbox_url}/_sandbox/callbacks/summary", timeout=10).json()


def calls_for(receiver: WebhookReceiver, message_id: str) -> list[dict[str, Any]]:
    return receiver.matching(lambda call: f"message_id={message_id}&" in call["path"])


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed sandbox's child is reaped by whoever adopts it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_callbacks_come_from_a_child_process_and_sends_do_not_wait_for_it(
    sandbox: BackgroundSandbox, receiver: WebhookReceiver
) -> None:
    poster = summary(sandbox.url)["poster_pid"]
    assert poster != os.getpid() and parent_of(poster) == os.getpid()
    set_faults(sandbox.url, receipt_delay_ms=0)
    os.kill(poster, signal.SIGSTOP)  # the callback process cannot run at all
    try:
        for i in range(20):
            began = time.monotonic()
            assert send(sandbox.url, receiver, f"m-stopped-{i}").status_code == 201
            assert time.monotonic() - began < SEND_BOUND_S
        time.sleep(0.3)  # their receipts were due at once: none came, since only the stopped process posts them
        assert receiver.calls == []
    finally:
        os.kill(poster, signal.SIGCONT)
    wait_for(lambda: len(receiver.calls) == 40)
    assert [call["params"]["MessageStatus"] for call in calls_for(receiver, "m-stopped-7")] == ["sent", "delivered"]
    counts = wait_for(lambda: (found := summary(sandbox.url))["total"]["pending"] == 0 and found)
    assert (counts["twilio"]["scheduled"], counts["twilio"]["posted_ok"]) == (40, 40)


def test_reset_drops_what_was_planned_before_it_in_either_process(
    sandbox: BackgroundSandbox, receiver: WebhookReceiver
) -> None:
    set_faults(sandbox.url, receipt_delay_ms=400)
    for i in range(30):  # the last few may still wait in the sandbox's batch when the reset comes
        assert send(sandbox.url, receiver, f"m-dropped-{i}").status_code == 201
    assert requests.post(f"{sandbox.url}/_sandbox/reset", timeout=10).json() == {"ok": True}
    assert summary(sandbox.url)["total"] == dict.fromkeys(
        ("scheduled", "posted_ok", "attempts", "failed_attempts", "given_up", "pending"), 0
    )
    set_faults(sandbox.url, receipt_delay_ms=400)
    send(sandbox.url, receiver, "m-after-reset")  # due after every dropped one would have been
    wait_for(lambda: len(calls_for(receiver, "m-after-reset")) == 2)
    assert receiver.matching(lambda call: "message_id=m-dropped-" in call["path"]) == []
    logged = requests.get(f"{sandbox.url}/_sandbox/callbacks", timeout=10).json()
    assert logged["count"] == 2 and logged["summary"]["twilio"]["scheduled"] == 2


def test_in_process_callbacks_when_configured(receiver: WebhookReceiver) -> None:
    with start_background(SandboxConfig(ACCOUNT_SID, AUTH_TOKEN, callback_process=False)) as local:
        assert summary(local.url)["poster_pid"] == os.getpid()
        set_faults(local.url, receipt_delay_ms=0)
        send(local.url, receiver, "m-in-process")
        wait_for(lambda: len(calls_for(receiver, "m-in-process")) == 2)


def test_stopping_the_sandbox_ends_its_callback_process() -> None:
    local = start_background(SandboxConfig(ACCOUNT_SID, AUTH_TOKEN))
    poster = summary(local.url)["poster_pid"]
    assert running(poster)
    local.stop()
    assert not running(poster)


def test_a_killed_sandbox_leaves_no_callback_process_behind() -> None:
    port = free_port()
    sandbox = subprocess.Popen(
        [sys.executable, "manage.py", "run_sandbox_provider", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    poster = None
    try:
        assert sandbox.stdout is not None
        line = sandbox.stdout.readline()
        assert "listening" in line, line + sandbox.stdout.read()
        poster = summary(f"http://127.0.0.1:{port}")["poster_pid"]
        assert poster != sandbox.pid and parent_of(poster) == sandbox.pid
        os.kill(sandbox.pid, signal.SIGKILL)  # no cleanup runs, no atexit
        sandbox.wait(timeout=10)
        wait_for(lambda: not running(poster), timeout=10)
    finally:
        if sandbox.poll() is None:
            sandbox.kill()
            sandbox.wait(timeout=10)
        if poster is not None and running(poster):
            os.kill(poster, signal.SIGKILL)  # do not leak it even when the test fails
