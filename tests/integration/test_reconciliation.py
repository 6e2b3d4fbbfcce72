"""Knowing before the customer does, through the real stack: lost receipts found by a nightly
reconciliation (one run at a time), and a provider that silently drops messages raising an alert
that resolves when the drops stop. Traffic goes API -> workers -> sandbox -> signed receipts."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from django.utils import timezone

from messaging.models import Message, ProviderRoute
from messaging.services import api_key_create
from reconciliation.models import Alert, DeliveryBucket, ReconciliationRun
from reconciliation.reconcile import reconciliation_run
from tests.integration.test_dispatch_flow import post_batch
from tests.support.processes import PYTHON, REPO, wait_until
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def key(live):
    return api_key_create(client_name="acme")[1]


def numbers(start: int, count: int) -> list[str]:
    return [f"+1415555{start + i:04d}" for i in range(count)]


def test_a_nightly_run_finds_exactly_the_lost_receipts_and_a_concurrent_run_does_nothing(live, key):
    live.sandbox_faults("twilio", receipt_loss_rate=0.05)
    items = [{"channel": "sms", "to": to, "body": f"Order {n} shipped", "priority": "bulk"} for n, to in
             enumerate(numbers(1000, 1000))]  # fmt: skip
    ids = []
    for start in range(0, len(items), 500):
        ids += post_batch(live, key, items[start : start + 500])
    wait_until(lambda: len(live.sandbox_requests(provider="twilio", accepted="true")) == 1000, 120, what="all sent")
    lost = {r["message_id"] for r in live.sandbox_requests(provider="twilio") if r.get("fault") == "receipt_loss"}
    assert 20 <= len(lost) <= 90, len(lost)  # about 5 %
    wait_until(
        lambda: Message.objects.filter(pk__in=ids, state="delivered").count() == 1000 - len(lost),
        120,
        what="every receipt that was sent to arrive",
    )
    behind = set(Message.objects.filter(pk__in=ids, state="dispatched").values_list("pk", flat=True))
    assert {str(pk) for pk in behind} == lost

    live.sandbox_faults("twilio", latency_ms=60)  # look-ups take a while: the run lasts seconds
    command = subprocess.Popen(
        [PYTHON, "manage.py", "reconcile", "--date", str(timezone.now().date())],
        cwd=REPO, env=live.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: ReconciliationRun.objects.filter(status="running").exists(), 60, interval=0.02)
        assert reconciliation_run(day=timezone.now().date(), trigger="concurrent test") is None
        out, err = command.communicate(timeout=120)
    finally:
        if command.poll() is None:
            command.kill()
    assert command.returncode == 0, err
    run = ReconciliationRun.objects.get()  # the concurrent attempt stored nothing
    print(out)
    assert (run.status, run.checked, run.looked_up, run.updated, run.still_unknown) == (
        "completed", 1000, len(lost), len(lost), 0,
    )  # fmt: skip
    assert run.mismatches == {"missing_receipt": len(lost)}
    updated = set(Message.objects.filter(pk__in=ids, receipts__source="poll").values_list("pk", flat=True))
    assert updated == behind and Message.objects.filter(pk__in=ids, state="delivered").count() == 1000
    assert Counter(r["message_id"] for r in live.sandbox_requests(accepted="true")).most_common(1)[0][1] == 1


SHORT_WINDOWS = {
    "bucket_seconds": 2,
    "receipt_maturity_seconds": 4,
    "windows_seconds": [6, 10],
    "baseline_seconds": 20,
    "min_samples": 30,
    # Once the alert degrades twilio for the US (issue 24), only the transactional probe share
    # (5 % of 30 msg/s) still goes there: recovery is judged on what a few buckets hold of it.
    # 10, not fewer: while the 20 % drop lasts, 10 probes all receipted by chance is 0.8^10 (1 in 9)
    # a tick; a 10 s window holds ~15 of them.
    "min_recovery_samples": 10,
    "z_threshold": 4.0,
}


class Traffic(threading.Thread):
    """Posts a batch of SMS every half second until stopped."""

    def __init__(self, live, key, per_tick: int = 15):
        super().__init__(daemon=True)
        self.live, self.key, self.per_tick = live, key, per_tick
        self.stopped = threading.Event()
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        session = self.live.api(self.key)
        while not self.stopped.is_set():
            batch = [
                {"channel": "sms", "to": f"+1415556{(self.sent + i) % 10000:04d}", "body": f"Code {self.sent + i}"}
                for i in range(self.per_tick)
            ]
            try:
                response = session.post(
                    f"{self.live.web_url}/api/v1/messages/batch/", json={"messages": batch}, timeout=30
                )
                response.raise_for_status()
                self.sent += self.per_tick
            except Exception as exc:  # recorded and shown: the test then fails on missing traffic
                self.errors.append(repr(exc))
            self.stopped.wait(0.5)


def _recent_share(provider: str, seconds: float = 3.0) -> float:
    """The share of the messages dispatched in the last few seconds that went through `provider`."""
    recent = Counter(
        Message.objects.filter(dispatched_at__gte=timezone.now() - timedelta(seconds=seconds)).values_list(
            "provider", flat=True
        )
    )
    return recent[provider] / max(1, sum(recent.values()))


def test_a_silent_drop_raises_an_alert_that_resolves_when_drops_stop(live, key):
    with WebhookReceiver() as receiver:
        receiver.answers = [500]  # the alert endpoint fails once: the post is retried
        live.replace_workers(
            env={"CONDUCTOR_ANOMALY": json.dumps(SHORT_WINDOWS), "ALERT_WEBHOOK_URL": f"{receiver.base}/alerts"}
        )
        traffic = Traffic(live, key)
        traffic.start()
        try:
            # Steady traffic until the detector has a full baseline behind its longest window:
            # (20 s + 10 s + 4 s maturity) / 2 s buckets; nothing may alarm meanwhile.
            wait_until(
                lambda: DeliveryBucket.objects.filter(provider="twilio", seconds=2, dispatched__gt=0).count() >= 18,
                90,
                interval=0.5,
                what="a full baseline of traffic",
            )
            assert not Alert.objects.exists(), list(Alert.objects.values())
            live.sandbox_faults("twilio", drop_rate=0.2)
            dropped_at = time.monotonic()
            wait_until(lambda: Alert.objects.filter(kind="receipt_rate_drop").exists(), 60, interval=0.5)
            detected_after = time.monotonic() - dropped_at
            # All the traffic goes to US numbers: the provider-wide cohort and the US one both alarm
            # (not always on the same tick: a loaded run saw the US one first).
            wait_until(
                lambda: (
                    Alert.objects.filter(kind="receipt_rate_drop", country="").exists()
                    and Alert.objects.filter(kind="receipt_rate_drop", country="US").exists()
                ),
                30,
                interval=0.5,
                what="the provider-wide and the US alert",
            )
            alert = Alert.objects.get(kind="receipt_rate_drop", country="")
            assert (alert.channel, alert.provider) == ("sms", "twilio")
            assert alert.baseline > 0.95 and alert.observed <= alert.baseline - 0.05, (alert.observed, alert.baseline)
            assert Alert.objects.filter(kind="receipt_rate_drop", provider="twilio", country="US").exists()
            # ... and the detector moved new US traffic off twilio on the same tick (docs/routing.md).
            route = ProviderRoute.objects.get(provider="twilio", country="US")
            assert (route.condition, route.source) == ("degraded", "detector")
            wait_until(lambda: _recent_share("vonage") >= 0.8, 30, interval=0.5, what="new traffic on vonage")

            live.sandbox_faults("twilio", drop_rate=0.0)
            recovered_at = time.monotonic()
            # Recovery is seen on the probe share alone; then the detector restores the route.
            wait_until(
                lambda: not Alert.objects.filter(kind="receipt_rate_drop", resolved_at__isnull=True).exists(),
                120,
                interval=0.5,
                what="every receipt-rate alert resolved",
            )
            resolved_after = time.monotonic() - recovered_at
            wait_until(
                lambda: ProviderRoute.objects.get(provider="twilio", country="US").condition == "healthy",
                30,
                what="twilio healthy again for the US",
            )
            wait_until(lambda: _recent_share("twilio") >= 0.8, 30, interval=0.5, what="new traffic back on twilio")
        finally:
            traffic.stopped.set()
            traffic.join(10)
        assert not traffic.errors, traffic.errors[:3]

        def posted():
            return [(c["body"]["event"], c["body"]["kind"]) for c in receiver.matching(lambda c: c["status"] == 200)]

        wait_until(lambda: ("resolved", "receipt_rate_drop") in posted(), 90, what="the resolution posted")
        assert ("opened", "receipt_rate_drop") in posted()
        assert receiver.calls[0]["status"] == 500  # the first post failed and was retried
    print(
        f"{traffic.sent} messages; alert after {detected_after:.1f} s of drops, resolved {resolved_after:.1f} s after"
    )
