"""Everything at once: flaky providers, workers SIGKILLed, Redis restarted — nothing lost, nothing doubled."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from messaging.models import DispatchAttempt, Message, MessageEvent
from messaging.services import api_key_create
from tests.integration.test_dispatch_flow import accepted_sends_per_message, post_batch, states
from tests.support.processes import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

MESSAGES = 1200
WORKERS = 4
KILLS = 20
REDIS_RESTARTS = 2
SETTLED = {"delivered", "failed", "undelivered", "expired", "dead_lettered"}


def test_flaky_providers_killed_workers_and_redis_restarts_lose_and_double_nothing(live):
    key = api_key_create(client_name="acme")[1]
    # 40% failing providers trip a 50% circuit most of the time, and the run would measure the
    # circuits' patience (minutes) rather than recovery from kills and restarts: raise the bar.
    live.replace_workers(env={"CONDUCTOR_CIRCUIT_FAILURE_RATE_THRESHOLD": "0.9"}, count=WORKERS)
    for provider in ("twilio", "vonage"):
        live.sandbox_faults(provider, error_rate=0.3, timeout_rate=0.05, timeout_hold_ms=3500, latency_ms=5)
    items = [
        {"channel": "sms", "to": f"+1202555{i:04d}", "body": f"Notice {i}", "category": "fast_retry"}
        for i in range(MESSAGES)
    ]
    started = time.monotonic()
    ids = post_batch(live, key, items[: MESSAGES // 2])
    chaos_log: list[str] = []
    rng = random.Random(11)

    def chaos() -> None:
        restarts_at = {KILLS // 3, 2 * KILLS // 3}
        starting = []
        for kill in range(KILLS):
            time.sleep(rng.uniform(0.5, 1.5))
            # Replacements boot while the chaos goes on (seconds each): the victim is any worker
            # that is up, the one killed mid-sweep included.
            wait_until(lambda: live.workers, 60, interval=0.1, what="a worker up to kill")
            victim = rng.choice(live.workers)
            live.kill_worker(victim)
            starting.append(live.start_worker_in_background(env=live.worker_env))
            chaos_log.append(f"killed {victim.name}")
            if kill in restarts_at:
                live.restart_redis()
                chaos_log.append("restarted redis")
        for started in starting:
            started.result(timeout=60)

    thread = threading.Thread(target=chaos)
    thread.start()
    ids += post_batch(live, key, items[MESSAGES // 2 :])
    thread.join(timeout=300)
    assert not thread.is_alive()
    chaos_seconds = time.monotonic() - started
    wait_until(lambda: sum(states(ids)[s] for s in SETTLED) == MESSAGES, 420, interval=1, what="every message final")
    final = states(ids)
    per_message = accepted_sends_per_message(live)
    duplicates = {message_id: n for message_id, n in per_message.items() if n > 1}
    faults = Counter(r["fault"] for r in live.sandbox_requests())
    print(
        f"\n{MESSAGES} messages, {WORKERS} workers, {chaos_log.count('restarted redis')} Redis restarts, "
        f"{len(chaos_log) - chaos_log.count('restarted redis')} SIGKILLs in {chaos_seconds:.0f} s; "
        f"all final after {time.monotonic() - started:.0f} s: {dict(final)}; provider faults {dict(faults)}; "
        f"accepted twice: {len(duplicates)}; in the database: {Message.objects.filter(pk__in=ids).count()}"
    )
    assert Message.objects.filter(pk__in=ids).count() == MESSAGES  # nothing lost
    for message_id in duplicates:
        print(_story(live, message_id))
    assert duplicates == {}  # nothing doubled
    assert chaos_log.count("restarted redis") == REDIS_RESTARTS
    assert faults["error"] > 100 and faults["timeout"] > 50  # the faults were really there


def _story(live, message_id: str) -> str:
    """Everything known about one message, in time order: what a doubled send needs to be explained."""
    lines = [f"message {message_id}:"]
    for r in live.sandbox_requests(message_id=message_id):
        lines.append(f"  {r['received_at']} sandbox {r['provider']} {r['status_code']} {r['fault']} {r['token']}")
    for a in DispatchAttempt.objects.filter(message_id=message_id).order_by("started_at"):
        lines.append(
            f"  {a.started_at.isoformat()} attempt #{a.number} g{a.send_generation} {a.provider} {a.outcome} "
            f"until {a.ended_at and a.ended_at.isoformat()} {a.note} {a.error_type} {a.error_code} "
            f"{a.error_message[:120]}"
        )
    for e in MessageEvent.objects.filter(message_id=message_id).order_by("created_at"):
        when = e.created_at.isoformat()
        lines.append(f"  {when} event {e.from_state}->{e.to_state} {e.applied} {e.source} {e.detail}")
    for log in sorted(live.log_dir.glob("*.log")):
        lines += [f"  {log.name}: {line.rstrip()[:400]}" for line in log.open(errors="replace") if message_id in line]
    return "\n".join(lines)
