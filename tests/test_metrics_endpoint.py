"""/metrics: behind a bearer token when one is configured, and its database families read once per
cache interval however often it is scraped."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from conductor_project import metrics

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_cache():
    metrics.database_families_cache.clear()
    yield
    metrics.database_families_cache.clear()


def messages_gauge(text: str, state: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("conductor_messages{") and f'state="{state}"' in line
    )


def test_without_a_token_configured_metrics_are_open(client, settings):
    settings.METRICS_TOKEN = None
    assert client.get("/metrics").status_code == 200


def test_with_a_token_configured_metrics_need_it(client, settings):
    settings.METRICS_TOKEN = "s3cr3t-scrape-token"
    for headers in ({}, {"HTTP_AUTHORIZATION": "Bearer wrong"}, {"HTTP_AUTHORIZATION": "Basic s3cr3t-scrape-token"}):
        refused = client.get("/metrics", **headers)
        assert refused.status_code == 401 and refused["WWW-Authenticate"].startswith("Bearer")
        assert b"conductor_" not in refused.content
    answered = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cr3t-scrape-token")
    assert answered.status_code == 200 and b"conductor_messages" in answered.content


def test_a_second_scrape_within_the_interval_runs_no_database_query(client, settings, make_message, monkeypatch):
    settings.METRICS_CACHE_SECONDS = 15.0
    clock = [1000.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    make_message()

    with CaptureQueriesContext(connection) as first:
        text = client.get("/metrics").content.decode()
    assert len(first.captured_queries) >= 7  # six GROUP BYs and the delivery rate's
    assert messages_gauge(text, "accepted") == 1

    make_message()
    clock[0] += 14.0
    with CaptureQueriesContext(connection) as second:
        text = client.get("/metrics").content.decode()
    assert second.captured_queries == []
    assert messages_gauge(text, "accepted") == 1  # the numbers of the first scrape
    assert 'conductor_scrape_error{source="database"} 0.0' in text

    clock[0] += 1.0  # the interval is over: read again
    with CaptureQueriesContext(connection) as third:
        text = client.get("/metrics").content.decode()
    assert len(third.captured_queries) == len(first.captured_queries)
    assert messages_gauge(text, "accepted") == 2


def test_with_no_interval_every_scrape_reads_the_database(client, settings, make_message):
    settings.METRICS_CACHE_SECONDS = 0
    make_message()
    assert messages_gauge(client.get("/metrics").content.decode(), "accepted") == 1
    make_message()
    assert messages_gauge(client.get("/metrics").content.decode(), "accepted") == 2
