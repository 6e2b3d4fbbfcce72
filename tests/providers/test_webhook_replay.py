"""Replay protection for webhooks signed over a timestamp and a one-time token: the window either
way of our clock, each token taken once across processes (Redis), and closed when Redis is down."""

from __future__ import annotations

import socket
import time

import pytest

from providers.redis_state import reset_shared_redis, shared_redis
from providers.types import WebhookReplayError, WebhookSignatureError, WebhookStateUnavailable
from providers.webhook_replay import webhook_token_claim, webhook_token_release

WINDOW = 300.0


def claim(token: str = "t" * 50, timestamp: float | str | None = None, max_age_seconds: float = WINDOW) -> str:
    stamp = time.time() if timestamp is None else timestamp
    return webhook_token_claim(provider="mailgun", token=token, timestamp=stamp, max_age_seconds=max_age_seconds)


def test_a_fresh_token_is_taken_once():
    key = claim("a" * 50)
    with pytest.raises(WebhookReplayError, match="already used"):
        claim("a" * 50)
    assert shared_redis().exists(key)


def test_a_replay_is_a_signature_error_so_every_webhook_path_refuses_it_with_403():
    assert issubclass(WebhookReplayError, WebhookSignatureError)


def test_tokens_are_kept_as_long_as_they_could_be_replayed():
    key = claim("b" * 50)
    # Signed up to one window ahead, a token stays within the window for up to two.
    assert 2 * WINDOW <= shared_redis().ttl(key) <= 2 * WINDOW + 1


@pytest.mark.parametrize(("offset", "words"), [(-WINDOW - 5, "old"), (WINDOW + 5, "ahead")])
def test_a_signature_outside_the_window_is_refused_and_its_token_not_spent(offset, words):
    with pytest.raises(WebhookReplayError, match=words):
        claim("c" * 50, timestamp=time.time() + offset)
    claim("c" * 50)  # still takeable with a fresh signature


def test_the_window_is_the_callers():
    with pytest.raises(WebhookReplayError):
        claim("d" * 50, timestamp=time.time() - 20, max_age_seconds=10)
    claim("d" * 50, timestamp=time.time() - 20, max_age_seconds=30)


@pytest.mark.parametrize("timestamp", ["yesterday", "", "nan", "inf", [], None])
def test_a_timestamp_that_is_not_a_number_is_refused(timestamp):
    with pytest.raises(WebhookReplayError):
        webhook_token_claim(provider="mailgun", token="e" * 50, timestamp=timestamp, max_age_seconds=WINDOW)


@pytest.mark.parametrize("token", ["", None, 42, ["x"]])
def test_a_missing_or_odd_token_is_refused(token):
    with pytest.raises(WebhookReplayError):
        webhook_token_claim(provider="mailgun", token=token, timestamp=time.time(), max_age_seconds=WINDOW)


def test_a_released_token_can_be_taken_again():
    # A webhook that failed before it was stored: the provider's retry must not be a "replay".
    webhook_token_release(claim("f" * 50))
    claim("f" * 50)


def test_tokens_are_per_provider():
    claim("g" * 50)
    webhook_token_claim(provider="postmark", token="g" * 50, timestamp=time.time(), max_age_seconds=WINDOW)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{closed_port()}/0"
    reset_shared_redis()
    yield
    reset_shared_redis()


def test_with_redis_down_every_webhook_is_refused_for_now(redis_down):
    # Closed: a replay cannot be told from a new webhook, and the provider retries a 503.
    started = time.monotonic()
    with pytest.raises(WebhookStateUnavailable):
        claim("h" * 50)
    assert time.monotonic() - started < 2, "a dead Redis must not stall the webhook"
    webhook_token_release("conductor:webhook-token:mailgun:x")  # logged, not raised
