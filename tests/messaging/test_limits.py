"""Per-client limits through the API: priorities a client may send (403 naming `priority`), daily
quotas per channel (429 naming `channel`, per item in a batch, a warning at 80 %) and the request
rate (429 with Retry-After). Real Redis (the quota counters and the throttle cache)."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import REGISTRY

from messaging.limits import quota_retry_after
from messaging.models import ApiClient, Message

pytestmark = pytest.mark.django_db

URL = "/api/v1/messages/"
BATCH_URL = "/api/v1/messages/batch/"
SMS = {"channel": "sms", "to": "+14155552671", "body": "Your code is 123456"}


def numbers(count: int, start: int = 0, **fields) -> list[dict]:
    return [{**SMS, "to": f"+1415555{start + i:04d}", **fields} for i in range(count)]


def limit(client: ApiClient, **fields) -> None:
    ApiClient.objects.filter(pk=client.pk).update(**fields)


def post(api, data, url=URL, **headers):
    return api.post(url, data=json.dumps(data), content_type="application/json", **headers)


# --- priorities -------------------------------------------------------------------------------
def test_a_priority_the_client_may_not_send_is_a_403_naming_priority_and_stores_nothing(api, client_key):
    limit(client_key[0], allowed_priorities=["transactional", "bulk"])
    response = post(api, {**SMS, "priority": "critical"})
    assert response.status_code == 403, response.content
    assert list(response.json()) == ["priority"] and "critical" in response.json()["priority"][0]
    assert not Message.objects.exists()
    assert post(api, {**SMS, "priority": "transactional"}).status_code == 201


def test_in_a_batch_a_refused_priority_is_a_per_item_403(api, client_key):
    limit(client_key[0], allowed_priorities=["bulk"])
    items = [{**SMS, "priority": "bulk"}, {**SMS, "priority": "critical"}, {**SMS, "to": "+14155550001"}]
    body = post(api, {"messages": items}, url=BATCH_URL).json()
    assert [r["status"] for r in body["results"]] == [201, 403, 403]
    assert list(body["results"][1]["errors"]) == ["priority"]
    assert (body["created"], body["failed"]) == (1, 2) and Message.objects.count() == 1


def test_the_allowed_priorities_setting_is_the_default(api, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ALLOWED_PRIORITIES": ["transactional"]}
    assert post(api, {**SMS, "priority": "bulk"}).status_code == 403
    assert post(api, SMS).status_code == 201


# --- daily quotas -----------------------------------------------------------------------------
def warnings_counted(client: str, channel: str) -> float:
    labels = {"client": client, "channel": channel}
    return REGISTRY.get_sample_value("conductor_quota_warnings_total", labels) or 0.0


def test_a_batch_past_the_daily_quota_is_refused_item_by_item_after_a_warning_at_80_percent(api, client_key, caplog):
    client = client_key[0]
    limit(client, sms_daily_quota=10)
    before = warnings_counted(client.name, "sms")
    with caplog.at_level(logging.WARNING, logger="messaging.limits"):
        first = post(api, {"messages": numbers(7)}, url=BATCH_URL).json()
        assert first["created"] == 7 and not [r for r in caplog.records if "daily sms quota" in r.getMessage()]
        second = post(api, {"messages": numbers(5, start=100)}, url=BATCH_URL).json()
    # The first three fit (8 crosses 80 % of 10: warned once), the last two are refused, in order.
    assert [r["status"] for r in second["results"]] == [201, 201, 201, 429, 429]
    assert list(second["results"][3]["errors"]) == ["channel"]
    assert "quota of 10 sms" in second["results"][3]["errors"]["channel"][0]
    assert Message.objects.count() == 10
    warned = [r for r in caplog.records if "daily sms quota" in r.getMessage()]
    assert len(warned) == 1 and "used 10 of its daily sms quota of 10" in warned[0].getMessage()
    assert warnings_counted(client.name, "sms") == before + 1
    # A single message is a 429 saying when the quota renews; another channel has its own quota.
    single = post(api, {**SMS, "to": "+14155559999"})
    assert single.status_code == 429 and list(single.json()) == ["channel"]
    assert 0 < int(single["Retry-After"]) <= 24 * 3600
    assert post(api, {"channel": "email", "to": "a@example.com", "subject": "s", "body": "b"}).status_code == 201


def test_replays_and_rolled_back_items_do_not_spend_the_quota(api, client_key):
    limit(client_key[0], sms_daily_quota=3)
    keyed = [{**item, "idempotency_key": f"k{i}"} for i, item in enumerate(numbers(3))]
    assert post(api, {"messages": keyed}, url=BATCH_URL).json()["created"] == 3
    # The quota is spent, but a retried request replays what it stored (200), not a 429.
    again = post(api, {"messages": keyed}, url=BATCH_URL).json()
    assert [r["status"] for r in again["results"]] == [200, 200, 200]
    assert post(api, numbers(1, start=50)[0]).status_code == 429


def test_replays_give_their_quota_back(api, client_key):
    limit(client_key[0], sms_daily_quota=4)
    keyed = [{**item, "idempotency_key": f"k{i}"} for i, item in enumerate(numbers(2))]
    post(api, {"messages": keyed}, url=BATCH_URL)
    post(api, {"messages": keyed}, url=BATCH_URL)  # taken, then given back: nothing new stored
    assert post(api, {"messages": numbers(2, start=10)}, url=BATCH_URL).json()["created"] == 2
    assert post(api, numbers(1, start=20)[0]).status_code == 429


def test_the_quota_renews_at_midnight_utc():
    from datetime import UTC, datetime

    assert quota_retry_after(datetime(2026, 12, 5, 23, 59, 30, tzinfo=UTC)) == 30


# --- request rate -----------------------------------------------------------------------------
def test_past_its_rate_a_client_gets_429_with_retry_after_and_others_do_not(api, other_api, client_key):
    limit(client_key[0], api_rate="3/min")
    codes = [api.get(URL).status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    refused = api.get(URL)
    assert refused.status_code == 429 and 0 < int(refused["Retry-After"]) <= 60
    assert other_api.get(URL).status_code == 200  # the default rate, counted apart


def test_the_api_rate_setting_is_the_default_and_none_turns_it_off(api, client_key, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "API_RATE": "2/min"}
    assert [api.get(URL).status_code for _ in range(3)] == [200, 200, 429]
    limit(client_key[0], api_rate="none")
    assert [api.get(URL).status_code for _ in range(3)] == [200, 200, 200]


def test_with_redis_unreachable_the_rate_and_the_quota_fail_open(api, client_key, settings):
    from providers.redis_state import reset_shared_redis
    from tests.support.processes import free_port

    limit(client_key[0], api_rate="1/min", sms_daily_quota=1)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings.CACHES = {**settings.CACHES, "throttle": {**settings.CACHES["throttle"], "LOCATION": dead}}
    settings.REDIS_URL = dead
    reset_shared_redis()
    try:
        assert [post(api, numbers(1, start=i)[0]).status_code for i in range(3)] == [201, 201, 201]
    finally:
        reset_shared_redis()
