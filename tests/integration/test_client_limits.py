"""Limits between clients on the real stack (issue 20): bulk capacity shared fairly (a small
client's messages are not stuck behind another's campaign), and the request rate counted once for
every gunicorn process (429 with Retry-After over real HTTP)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from messaging.models import ApiClient, Message
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import SMS, post_batch, wait_for_all

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SENT = {"dispatched", "delivered"}


def bulk(count: int, start: int) -> list[dict]:
    """Bulk SMS to distinct valid US numbers, +1415555xxxx and up (as bench/_support.py)."""
    return [{**SMS, "to": f"+1415{5_550_000 + start + i:07d}", "priority": "bulk"} for i in range(count)]


def sent_count(client: str) -> int:
    return Message.objects.filter(client__name=client, state__in=SENT).count()


def test_a_small_clients_bulk_messages_go_out_within_seconds_while_a_big_campaign_drains(live):
    big, small = api_key_create(client_name="big")[1], api_key_create(client_name="small")[1]
    # 100 ms a send, 10 at once per worker process: the 20,000 take about a minute to drain, so
    # the big campaign is still queued (about 40 bulk tasks of 500) when the small client posts.
    # Receipts off: the web process takes no callbacks (state stays dispatched).
    live.sandbox_faults(latency_ms=100, receipt_loss_rate=1.0)
    live.replace_workers(env={"CONDUCTOR_BULK_SEND_CONCURRENCY": "10"})
    with ThreadPoolExecutor(2) as pool:
        batches = pool.map(lambda start: post_batch(live, big, bulk(1000, start)), range(0, 20_000, 1000))
        big_ids = [message_id for batch in batches for message_id in batch]
    assert len(big_ids) == 20_000
    posted = time.monotonic()
    small_ids = post_batch(live, small, bulk(20, 30_000))  # posted after the whole campaign
    wait_for_all(small_ids, SENT, timeout=30)
    took = time.monotonic() - posted
    big_sent = sent_count("big")
    print(f"the small client's 20 bulk messages: sent {took:.1f} s after posting, {big_sent} of 20,000 big ones sent")
    # Queued first in, first out, the 20 would wait for all 20,000 (a minute here).
    assert took < 20
    assert big_sent < 10_000, "most of the big campaign should still be draining"


def test_past_its_rate_a_client_gets_429_with_retry_after_from_every_web_process(live):
    key, raw = api_key_create(client_name="chatty")
    ApiClient.objects.filter(pk=key.client_id).update(api_rate="5/min")
    headers = {"Authorization": f"Bearer {raw}"}
    # A new connection each: gunicorn's two processes share the requests between them, and a
    # count kept per process would allow each of them 5.
    answers = [requests.get(f"{live.web_url}/api/v1/messages/", headers=headers, timeout=10) for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
    assert 0 < int(answers[-1].headers["Retry-After"]) <= 60
    other = api_key_create(client_name="quiet")[1]
    ok = requests.get(f"{live.web_url}/api/v1/messages/", headers={"Authorization": f"Bearer {other}"}, timeout=10)
    assert ok.status_code == 200
