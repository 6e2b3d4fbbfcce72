"""The broker switch in settings (RabbitMQ: quorum queues, publisher confirms, a topic exchange;
Redis: a visibility timeout) and the checks that refuse broker settings breaking a guarantee."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.core.checks import run_checks
from django.test import override_settings
from kombu import Exchange, Queue

AMQP_URL = "amqp://guest:guest@127.0.0.1:1//"  # never connected to: settings and checks only

# What a process sees of its Celery settings, and its system checks (as JSON).
PROBE = """
import json, django
django.setup()
from django.conf import settings as s
from django.core.checks import run_checks
print(json.dumps({
    "queues": {q.name: [q.exchange.type, q.queue_arguments, q.durable] for q in s.CELERY_TASK_QUEUES},
    "options": s.CELERY_BROKER_TRANSPORT_OPTIONS,
    "default_exchange_type": s.CELERY_TASK_DEFAULT_EXCHANGE_TYPE,
    "default_queue_type": getattr(s, "CELERY_TASK_DEFAULT_QUEUE_TYPE", "classic"),
    "checks": sorted(m.id for m in run_checks() if m.id.startswith("conductor.")),
}))
"""


def probe(broker_url: str) -> dict:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "conductor_project.settings.base", "CELERY_BROKER_URL": broker_url}
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_an_amqp_broker_gets_durable_quorum_queues_on_a_topic_exchange_and_publisher_confirms():
    seen = probe(AMQP_URL)
    assert len(seen["queues"]) == 13
    assert {tuple(map(json.dumps, v)) for v in seen["queues"].values()} == {
        ('"topic"', '{"x-queue-type": "quorum"}', "true")
    }
    assert seen["options"]["confirm_publish"] is True and "visibility_timeout" not in seen["options"]
    assert seen["options"]["max_retries"] == 2  # an API request still gives up on a dead broker fast
    assert (seen["default_exchange_type"], seen["default_queue_type"]) == ("topic", "quorum")
    assert seen["checks"] == []


def test_a_redis_broker_keeps_its_direct_exchange_and_visibility_timeout():
    seen = probe("redis://127.0.0.1:6379/13")
    assert {(v[0], v[1]) for v in seen["queues"].values()} == {("direct", None)}
    assert seen["options"]["visibility_timeout"] == 600 and "confirm_publish" not in seen["options"]
    assert seen["checks"] == []


def quorum_queues(exchange_type: str = "topic", **arguments) -> list[Queue]:
    exchange = Exchange("conductor", type=exchange_type)
    return [
        Queue(name, exchange, routing_key=name, queue_arguments={"x-queue-type": "quorum", **arguments})
        for name in ("sms.critical", "maintenance")
    ]


AMQP = {
    "CELERY_BROKER_URL": AMQP_URL,
    "CELERY_BROKER_TRANSPORT_OPTIONS": {"confirm_publish": True},
    "CELERY_TASK_DEFAULT_EXCHANGE_TYPE": "topic",
}


def broker_check_ids() -> list[str]:
    return sorted(m.id for m in run_checks() if m.id.startswith("conductor.E13") or m.id.startswith("conductor.W13"))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"CELERY_TASK_QUEUES": quorum_queues()}, []),
        ({"CELERY_TASK_QUEUES": quorum_queues(**{"x-queue-type": "classic"})}, ["conductor.E130"] * 2),
        ({"CELERY_TASK_QUEUES": quorum_queues(**{"x-max-priority": 10})}, ["conductor.E130"] * 2),
        ({"CELERY_TASK_QUEUES": quorum_queues(), "CELERY_TASK_QUEUE_MAX_PRIORITY": 10}, ["conductor.E130"] * 2),
        ({"CELERY_TASK_QUEUES": quorum_queues(), "CELERY_WORKER_DETECT_QUORUM_QUEUES": False}, ["conductor.E131"]),
        ({"CELERY_TASK_QUEUES": quorum_queues("direct")}, ["conductor.E132"]),
        ({"CELERY_TASK_QUEUES": quorum_queues(), "CELERY_TASK_DEFAULT_EXCHANGE_TYPE": "direct"}, ["conductor.E132"]),
        ({"CELERY_TASK_QUEUES": quorum_queues(), "CELERY_BROKER_TRANSPORT_OPTIONS": {}}, ["conductor.W130"]),
    ],
    ids=["quorum", "classic", "priorities", "max-priority", "global-qos", "direct", "default-direct", "no-confirms"],
)
def test_rabbitmq_settings_that_break_a_guarantee_are_refused(overrides, expected):
    with override_settings(**{**AMQP, **overrides}):
        assert broker_check_ids() == expected


def test_a_redis_visibility_timeout_within_the_longest_countdown_is_refused():
    with override_settings(CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": 60}):
        assert broker_check_ids() == ["conductor.E133"]
    with override_settings(CELERY_BROKER_TRANSPORT_OPTIONS={"visibility_timeout": 61}):
        assert broker_check_ids() == []
