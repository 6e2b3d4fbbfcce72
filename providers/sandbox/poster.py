"""The sandbox's callback process: a child process that posts the receipt callbacks the sandbox plans.

Why a process of its own: the sandbox posts about two callbacks per send, and in one process
their cost lags the event loop that answers sends (a 200,000-message run saw the configured
50 ms API latency become 178 ms p50, 368 ms p95). A real provider's API latency does not depend
on how fast the receiver takes its callbacks, so the child posts them on its own event loop (and
its own CPU core) with the same ReceiptScheduler; the sandbox sends it the planned callbacks in
batches, its fault settings when they change, and asks it for the counters and log (and to
reset) when the control API is called. The child exits when the sandbox stops, or dies: it reads
the sandbox's end of a pipe, which closes with the sandbox however it ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from providers.sandbox import mailgun_api, twilio_api, vonage_api
from providers.sandbox.receipts import Encoder, ReceiptScheduler
from providers.sandbox.retries import RetryPolicy
from providers.sandbox.state import FaultSettings, SandboxConfig, StoredMessage

logger = logging.getLogger(__name__)

# Planned callbacks wait this long in the sandbox to travel to the child together: a send then
# costs the sandbox a list append, and each batch one pickling in a thread. A few ms against
# receipt delays of hundreds; the child keeps each callback's time from when it was planned.
FLUSH_INTERVAL_S = 0.005
# The child is a fresh interpreter (spawned, not forked from a running event loop): it imports
# the sandbox before it is ready, slowly on a busy machine.
START_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0

# sandbox -> child: (JOBS, [(provider, url, message, steps, policy, since)]), (FAULTS, faults),
# (ASK, id, RESET or (REPORT, records)), (STOP,). child -> sandbox: (ANSWER, id, payload); the
# answer with id READY_ID, the child's pid, says it is ready.
JOBS, FAULTS, ASK, STOP, ANSWER = "jobs", "faults", "ask", "stop", "answer"
RESET, REPORT = "reset", "report"
READY_ID = 0

Job = tuple[str, str, StoredMessage, Sequence[tuple[str, float]], RetryPolicy, float]


def callback_encoders(config: SandboxConfig) -> dict[str, Encoder]:
    """Each provider's callback encoder, built from the sandbox's config in whichever process posts."""
    return {
        twilio_api.PROVIDER: twilio_api.StatusCallbacks(config).encode,
        vonage_api.PROVIDER: vonage_api.DeliveryReceipts(config).encode,
        mailgun_api.PROVIDER: mailgun_api.TrackingWebhooks(config).encode,
    }


class CallbackProcess:
    """The sandbox's side of its callback process: plans go out in batches, questions are answered."""

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._process: multiprocessing.process.BaseProcess | None = None
        self._to_child: Connection | None = None
        self._from_child: Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: list[Job] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        # What a thread sends to the child, in order (None: stop sending).
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._answers: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(READY_ID + 1)
        self._lost = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        # spawn: a fresh interpreter; forking a process that runs an event loop and threads is unsafe.
        context = multiprocessing.get_context("spawn")
        child_inbox, to_child = context.Pipe(duplex=False)
        from_child, child_outbox = context.Pipe(duplex=False)
        ready = self._answers[READY_ID] = loop.create_future()
        # daemon: also terminated if the sandbox exits without stopping it (multiprocessing's atexit).
        self._process = context.Process(
            target=serve_callbacks,
            args=(self._config, child_inbox, child_outbox),
            name="sandbox-callbacks",
            daemon=True,
        )
        self._process.start()
        # The child holds its own copies now; without closing ours its end of file would never come.
        child_inbox.close()
        child_outbox.close()
        self._to_child, self._from_child = to_child, from_child
        self._threads = [
            threading.Thread(target=self._send, name="sandbox-callbacks-send", daemon=True),
            threading.Thread(target=self._receive, name="sandbox-callbacks-receive", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        try:
            await asyncio.wait_for(ready, START_TIMEOUT_S)
        except BaseException:
            await self.close()
            raise
        finally:
            self._answers.pop(READY_ID, None)

    async def close(self) -> None:
        if self._process is None:
            return
        process, self._process = self._process, None
        self._drop_jobs()
        self._outbox.put((STOP,))
        self._outbox.put(None)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, process.join, STOP_TIMEOUT_S)
        if process.is_alive():
            logger.warning("sandbox callback process %s did not stop in %s s: killing it", process.pid, STOP_TIMEOUT_S)
            process.kill()
            await loop.run_in_executor(None, process.join, STOP_TIMEOUT_S)
        for thread in self._threads:
            await loop.run_in_executor(None, thread.join, STOP_TIMEOUT_S)
        for connection in (self._to_child, self._from_child):
            if connection is not None:
                connection.close()
        if not process.is_alive():
            process.close()

    # --- the Receipts interface -------------------------------------------------------------------
    def schedule(
        self,
        *,
        provider: str,
        url: str,
        message: StoredMessage,
        steps: Sequence[tuple[str, float]],
        policy: RetryPolicy,
    ) -> None:
        if not steps or self._lost:
            return
        assert self._loop is not None, "CallbackProcess.start() was not awaited"
        # The loop's clock is time.monotonic(), one clock for every process on the machine.
        self._jobs.append((provider, url, message, steps, policy, self._loop.time()))
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_later(FLUSH_INTERVAL_S, self._flush)

    def faults_changed(self, faults: Mapping[str, FaultSettings]) -> None:
        self._flush()
        self._outbox.put((FAULTS, dict(faults)))

    async def reset(self) -> None:
        # Planned but not yet sent: they belong before the reset, so they never leave.
        self._drop_jobs()
        await self._ask(RESET)

    async def report(self, *, records: bool) -> dict[str, Any]:
        return await self._ask((REPORT, records))

    # --- talking to the child ----------------------------------------------------------------------
    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._jobs:
            self._outbox.put((JOBS, self._jobs))
            self._jobs = []

    def _drop_jobs(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._jobs = []

    async def _ask(self, question: Any) -> Any:
        if self._lost:
            raise ChildProcessError("the sandbox's callback process has exited")
        assert self._loop is not None, "CallbackProcess.start() was not awaited"
        self._flush()  # what was planned before the question is counted in its answer
        ask_id = next(self._ids)
        answer = self._answers[ask_id] = self._loop.create_future()
        self._outbox.put((ASK, ask_id, question))
        try:
            return await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        finally:
            self._answers.pop(ask_id, None)

    def _send(self) -> None:
        """Thread: pickles and writes what the loop queued, so that a full pipe never blocks the loop."""
        assert self._to_child is not None
        while (message := self._outbox.get()) is not None:
            try:
                self._to_child.send(message)
            except OSError as exc:  # the child has gone; _receive reports it
                logger.error("sandbox callback process unreachable: %s", exc)
                return

    def _receive(self) -> None:
        """Thread: hands the child's answers to the loop until the child's end closes."""
        assert self._from_child is not None and self._loop is not None
        try:
            while True:
                _, ask_id, payload = self._from_child.recv()
                self._loop.call_soon_threadsafe(self._answered, ask_id, payload)
        except (EOFError, OSError):
            pass
        try:
            self._loop.call_soon_threadsafe(self._child_gone)
        except RuntimeError:  # the loop has closed already: nobody is waiting
            pass

    def _answered(self, ask_id: int, payload: Any) -> None:
        answer = self._answers.get(ask_id)
        if answer is not None and not answer.done():
            answer.set_result(payload)

    def _child_gone(self) -> None:
        if self._process is not None:  # not stopping: a crash
            logger.error("sandbox callback process exited (%s): callbacks are no longer posted", self.pid)
        self._lost = True
        self._drop_jobs()
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(ChildProcessError("the sandbox's callback process has exited"))


# --- the child ---------------------------------------------------------------------------------------
def serve_callbacks(config: SandboxConfig, inbox: Connection, outbox: Connection) -> None:
    """The child's main: post what the sandbox plans until it says stop or goes away."""
    # Ctrl-C reaches the whole process group: the sandbox stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(config, inbox, outbox))


async def _serve(config: SandboxConfig, inbox: Connection, outbox: Connection) -> None:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def receive() -> None:
        try:
            while True:
                message = inbox.recv()
                loop.call_soon_threadsafe(received.put_nowait, message)
        except (EOFError, OSError):
            # The sandbox's end closed: it stopped, or died (even by SIGKILL). Stop with it.
            try:
                loop.call_soon_threadsafe(received.put_nowait, (STOP,))
            except RuntimeError:  # stopped already
                pass

    scheduler = ReceiptScheduler(callback_encoders(config))
    await scheduler.start()
    try:
        threading.Thread(target=receive, name="sandbox-callbacks-inbox", daemon=True).start()
        outbox.send((ANSWER, READY_ID, os.getpid()))
        # One message at a time, in order: a reset is done before anything planned after it.
        while True:
            message = await received.get()
            kind = message[0]
            if kind == JOBS:
                for provider, url, stored, steps, policy, since in message[1]:
                    scheduler.schedule(
                        provider=provider, url=url, message=stored, steps=steps, policy=policy, since=since
                    )
            elif kind == FAULTS:
                scheduler.faults_changed(message[1])
            elif kind == ASK:
                _, ask_id, question = message
                if question == RESET:
                    await scheduler.reset()
                    payload = None
                else:
                    payload = await scheduler.report(records=question[1])
                try:
                    outbox.send((ANSWER, ask_id, payload))
                except OSError:  # the sandbox has gone
                    return
            elif kind == STOP:
                return
    finally:
        await scheduler.close()
