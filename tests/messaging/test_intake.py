"""The receipt intake server (messaging.intake) in process, over real HTTP on loopback: it answers
and stores as the Django view does, shares writes between concurrent receipts, fails (5xx) the
receipts of a failed write and only those, and serves anymail's tracking URL through Django."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from django.db import connections
from django.utils import timezone

from messaging import receipts as receipts_module
from messaging.intake import intake_app
from messaging.models import Receipt
from tests.support.signed_receipts import MAILGUN_TRACKING_PATH, mailgun_body, mailgun_event, twilio_callback

pytestmark = pytest.mark.django_db(transaction=True)  # the writer thread has its own connection

RECEIPTS_URL = "https://receipts.conductor.example"


@pytest.fixture(autouse=True)
def receipts_url(settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "RECEIPTS_URL": RECEIPTS_URL}
    yield
    connections.close_all()


def serve(scenario: Callable[[aiohttp.ClientSession, str], Awaitable[Any]]) -> Any:
    """Run `scenario(session, base_url)` against the intake app on a free port."""

    async def main() -> Any:
        server = TestServer(intake_app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                return await scenario(session, str(server.make_url("")).rstrip("/"))
        finally:
            await server.close()

    return asyncio.run(main())


async def post_twilio(session: aiohttp.ClientSession, base: str, signed_over: str = RECEIPTS_URL, **kwargs) -> int:
    path, form, headers = twilio_callback(signed_over, **kwargs)
    async with session.post(base + path, data=form, headers=headers) as response:
        await response.read()
        return response.status


def test_a_signed_receipt_is_stored_and_answered_204_and_a_forged_one_403(settings):
    async def scenario(session, base):
        return [
            await post_twilio(session, base, sid="SM1", status="delivered"),
            # Signed over the web's URL: a callback URL given before the intake had one of its own.
            await post_twilio(session, base, signed_over=settings.CONDUCTOR["PUBLIC_URL"], sid="SM2"),
            await post_twilio(session, base, sid="SM3", auth_token="not-ours"),
            await post_twilio(session, base, signed_over="https://elsewhere.example", sid="SM4"),
        ]

    assert serve(scenario) == [204, 204, 403, 403]
    receipt = Receipt.objects.get(event_id="SM1:delivered")
    assert receipt.provider == "twilio" and receipt.mapped_state == "delivered" and receipt.processed_at is None
    assert receipt.payload["MessageStatus"] == "delivered"
    assert sorted(Receipt.objects.values_list("provider_message_id", flat=True)) == ["SM1", "SM2"]


def test_refusals_answer_as_the_django_view_does():
    async def scenario(session, base):
        answers = {}
        async with session.post(f"{base}/webhooks/nosuch/", data={}) as response:
            answers["unrouted"] = (response.status, (await response.json())["detail"])
        path, _, headers = twilio_callback(RECEIPTS_URL)
        async with session.post(base + path, data={"MessageSid": "SM1"}, headers=headers) as response:
            answers["unsigned fields"] = (response.status, (await response.json())["detail"])
        async with session.get(f"{base}/webhooks/twilio/") as response:
            answers["get, unsigned"] = (response.status, None)
        return answers

    assert serve(scenario) == {
        "unrouted": (404, "no configured route sends through 'nosuch'"),
        "unsigned fields": (403, "invalid signature"),
        "get, unsigned": (403, None),
    }
    assert not Receipt.objects.exists()


def test_concurrent_receipts_share_writes_and_each_answers_once_stored(monkeypatch):
    inserts: list[int] = []
    original = receipts_module._insert

    def slow_insert(rows):
        inserts.append(len(rows))
        time.sleep(0.02)  # a slow disk: the loop takes the next receipts meanwhile
        original(rows)

    monkeypatch.setattr(receipts_module, "_insert", slow_insert)

    async def scenario(session, base):
        return await asyncio.gather(*(post_twilio(session, base, sid=f"SM{n}") for n in range(60)))

    assert serve(scenario) == [204] * 60
    assert Receipt.objects.count() == 60 and sum(inserts) == 60
    assert len(inserts) < 20, f"receipts written alone: {inserts}"


def test_a_failed_write_answers_500_to_its_receipts_and_the_next_write_stores(monkeypatch):
    def broken(rows):
        raise RuntimeError("database gone")

    async def scenario(session, base):
        monkeypatch.setattr(receipts_module, "_insert", broken)
        failed = await post_twilio(session, base, sid="SM1")
        monkeypatch.undo()
        return failed, await post_twilio(session, base, sid="SM1")  # the provider's retry

    assert serve(scenario) == (500, 204)
    assert Receipt.objects.get().provider_message_id == "SM1"


def test_anymail_tracking_webhooks_run_their_django_view(make_message):
    message = make_message(channel="email", to="ada@example.com", state="dispatched", provider="mailgun")
    body = mailgun_body(mailgun_event(message_id=str(message.pk)))

    async def scenario(session, base):
        headers = {"Content-Type": "application/json"}
        async with session.post(base + MAILGUN_TRACKING_PATH, data=json.dumps(body), headers=headers) as response:
            first = response.status
        async with session.post(base + MAILGUN_TRACKING_PATH, data=json.dumps(body), headers=headers) as response:
            return first, response.status  # a replay of the same token

    assert serve(scenario) == (200, 403)
    assert Receipt.objects.filter(provider="mailgun").count() == 1


def test_inbound_message_webhooks_run_their_django_view(make_message, client_key):
    from messaging.models import Suppression
    from tests.support.signed_inbound import TWILIO_INBOUND_PATH, twilio_inbound

    make_message(to="+14155552671", state="dispatched", dispatched_at=timezone.now())
    form, headers = twilio_inbound("STOP", url=RECEIPTS_URL + TWILIO_INBOUND_PATH)
    headers = {"X-Twilio-Signature": headers["HTTP_X_TWILIO_SIGNATURE"]}

    async def scenario(session, base):
        async with session.post(base + TWILIO_INBOUND_PATH, data=form, headers=headers) as response:
            return response.status, response.headers["Content-Type"], await response.text()

    status, content_type, body = serve(scenario)
    assert (status, content_type.split(";")[0]) == (200, "text/xml") and "<Response" in body
    assert Suppression.objects.get(client=client_key[0]).reason == "stop_keyword"


def test_processes_share_the_port_and_none_outlives_a_killed_parent(tmp_path, settings):
    """`receipt_intake --processes 2`: two servers on one port (each stores what it takes); SIGKILL
    the parent and its fork stops within seconds (no orphan keeps the port)."""
    import os
    import re
    import signal

    import requests

    from tests.support.processes import PYTHON, ManagedProcess, free_port, wait_until

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    database = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "CONDUCTOR_RECEIPTS_URL": RECEIPTS_URL,
    }
    server = ManagedProcess(
        "intake", [PYTHON, "manage.py", "receipt_intake", "--port", str(port), "--processes", "2"], env, tmp_path
    ).start()
    try:
        wait_until(lambda: server.log_text().count("listening") == 2, 60, what="two intake processes")
        pids = {int(pid) for pid in re.findall(r"listening on \S+ \(pid (\d+)\)", server.log_text())}
        assert server.pid in pids and len(pids) == 2
        for n in range(20):  # new connections, spread by the kernel
            path, form, headers = twilio_callback(RECEIPTS_URL, sid=f"SM{n}")
            response = requests.post(base + path, data=form, headers={**headers, "Connection": "close"}, timeout=10)
            assert response.status_code == 204, response.text
        assert Receipt.objects.count() == 20
        (child,) = pids - {server.pid}
        os.kill(server.pid, signal.SIGKILL)
        wait_until(lambda: not _alive(child), 10, what="the orphaned intake process to stop")
    finally:
        server.kill()


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] != "Z"  # a zombie has stopped


def test_a_waiter_whose_loop_has_closed_does_not_stop_the_writer():
    """A webhook's loop gone before its write ends (a server shutting down): the writer thread
    goes on, and the next receipts are written."""
    from messaging.receipts import _GROUP_COMMIT, receipts_store

    loop = asyncio.new_event_loop()
    loop.close()
    done = threading.Event()
    _GROUP_COMMIT.submit([], lambda error: loop.call_soon_threadsafe(print))  # raises: loop closed
    _GROUP_COMMIT.submit([], lambda error: done.set())
    assert done.wait(5)
    receipts_store(events=[_event("SM-after")])
    assert Receipt.objects.filter(provider_message_id="SM-after").exists()


def _event(sid: str):
    from providers.types import ReceiptEvent

    return ReceiptEvent(
        provider="twilio",
        event_id=f"{sid}:delivered",
        provider_message_id=sid,
        provider_status="delivered",
        state="delivered",
        message_id=None,
        payload={},
    )
