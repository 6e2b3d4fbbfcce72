"""Infrastructure down at the wrong moment: the API is honest (503) and nothing accepted is lost."""

from __future__ import annotations

import time

import pytest
import requests

from messaging.models import Message
from messaging.services import api_key_create
from tests.support.faultproxy import FaultProxy
from tests.support.processes import PYTHON, ManagedProcess, free_port, http_ok, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SMS = {"channel": "sms", "to": "+14155552671", "body": "Your code is 123456", "priority": "critical"}


@pytest.fixture
def extra_web(live):
    """A second web process with some of its environment overridden; stopped by pid afterwards."""
    started: list[ManagedProcess] = []

    def start(**env_overrides: str) -> str:
        port = free_port()
        process = ManagedProcess(
            f"web-extra-{port}",
            [
                PYTHON,
                "-m",
                "gunicorn",
                "conductor_project.wsgi",
                "-b",
                f"127.0.0.1:{port}",
                "-w",
                "1",
                "-k",
                "gthread",
                "--threads",
                "4",
            ],
            {**live.env, **env_overrides},
            live.log_dir,
        ).start()
        started.append(process)
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, what="extra web")
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        process.stop()


def test_with_the_database_down_the_api_answers_503_and_readyz_says_so(live, extra_web):
    key = api_key_create(client_name="acme")[1]
    url = extra_web(DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/nowhere")
    response = requests.post(
        f"{url}/api/v1/messages/", json=SMS, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 503, response.text
    assert "database" in response.json()["detail"].lower()
    ready = requests.get(f"{url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["checks"]["broker"] == "ok"
    assert Message.objects.count() == 0


def test_with_the_broker_down_at_commit_the_message_is_accepted_and_the_sweeper_sends_it(live, extra_web):
    key = api_key_create(client_name="acme")[1]
    url = extra_web(CELERY_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    response = requests.post(
        f"{url}/api/v1/messages/", json=SMS, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert response.status_code == 201, response.text
    assert time.monotonic() - started < 5, "a dead broker must not stall the API"
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 503
    message_id = response.json()["id"]
    # Nothing was published; the live stack's beat-driven sweeper finds the row and sends it.
    wait_until(lambda: Message.objects.get(pk=message_id).state == "delivered", 30, what="delivery via the sweeper")
    assert len(live.sandbox_requests(message_id=message_id, accepted="true")) == 1


def test_a_worker_cut_off_from_the_database_mid_batch_loses_and_doubles_nothing(live):
    """The worker reaches PostgreSQL through a fault proxy that resets every connection for a while
    (what a database restart does to it): sends whose outcome could not be written are looked up,
    not resent."""
    from tests.integration.test_dispatch_flow import accepted_sends_per_message, post_batch, states

    key = api_key_create(client_name="acme")[1]
    with FaultProxy("127.0.0.1", 5432).start() as proxy:
        database = live.env["DATABASE_URL"].replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
        live.replace_workers(env={"DATABASE_URL": database, "CONN_MAX_AGE": "0"})
        live.sandbox_faults("twilio", latency_ms=100, latency_max_ms=300)
        items = [{**SMS, "to": f"+1415555{9000 + i:04d}", "priority": "transactional"} for i in range(60)]
        ids = post_batch(live, key, items)
        wait_until(lambda: len(accepted_sends_per_message(live)) >= 10, 30, what="some sends")
        proxy.reset()  # every connection to the database dies, new ones too
        time.sleep(3)
        assert states(ids)["accepted"] > 0, "the cut came too late to test anything"
        proxy.restore()
        wait_until(lambda: states(ids)["delivered"] == 60, 120, interval=0.5, what="all delivered")
    per_message = accepted_sends_per_message(live)
    assert set(per_message) == set(ids) and max(per_message.values()) == 1, "a message was accepted twice"
