"""Recipients are masked in logs, and URLs lose their secrets."""

import logging

import pytest

from messaging.logging import masked


def test_phone_numbers_keep_only_country_prefix_and_last_digits():
    assert masked("+14155552671") == "+1415*****71"


def test_email_keeps_first_letter_and_domain():
    assert masked("alice@example.com") == "a***@example.com"


def test_short_and_empty_values():
    assert masked("") == ""
    assert "*" in masked("+12345")


def test_free_text_has_its_recipients_masked_and_keeps_the_rest():
    from messaging.logging import scrubbed

    text = "permanent error: The 'To' number +14155552671 is not valid (21211); cc alice@example.com"
    assert scrubbed(text) == "permanent error: The 'To' number +1415*****71 is not valid (21211); cc a***@example.com"
    kept = "send generation 2; 3 rounds; SM0123; deadline 2026-11-30 04:00:00; code 123456"
    assert scrubbed(kept) == kept
    assert scrubbed("Vonage: invalid number 14155552671") == "Vonage: invalid number 14155****71"


def _records():
    import logging
    import sys
    import uuid
    from datetime import UTC, datetime

    def record(msg, args=(), exc_info=None, **extra):
        made = logging.LogRecord("messaging.outcomes", logging.INFO, __file__, 1, msg, args, exc_info)
        made.__dict__.update(extra)
        return made

    try:
        raise ValueError("boom")
    except ValueError:
        failure = sys.exc_info()
    return [
        record("message %s attempt %d", ("m-1", 2), event="attempt", latency_ms=54, to="+1415*****16"),
        record("plain"),
        record('unicode é ✓ and "quotes"', detail="line\nbreak", applied=False, value=None),
        record("objects", message_id=uuid.uuid4(), at=datetime(2026, 12, 2, 3, 4, 5, 6, tzinfo=UTC), task_id="t-1"),
        record("with a failure", exc_info=failure),
        record({"a dict": "message"}),
    ]


def test_the_fast_json_formatter_writes_what_python_json_logger_writes():
    from django.conf import settings
    from pythonjsonlogger.json import JsonFormatter

    from messaging.logging import FastJsonFormatter

    config = {key: value for key, value in settings.LOGGING["formatters"]["json"].items() if key != "()"}
    fast, library = FastJsonFormatter(**config), JsonFormatter(**config)
    for record in _records():
        assert fast.format(record) == library.format(record)


def test_urls_keep_only_their_scheme_and_host():
    from messaging.logging import redacted_url

    assert redacted_url("https://hooks.slack.com/services/T0/B0/s3cr3t") == "https://hooks.slack.com/…"
    assert redacted_url("http://alerts.internal:9000/hook?token=s3cr3t") == "http://alerts.internal:9000/…"
    assert redacted_url("https://alerts.example.com") == "https://alerts.example.com"
    assert redacted_url("not a url s3cr3t") == "…"


@pytest.mark.django_db
def test_a_retry_logs_the_providers_error_text_with_the_recipient_masked(make_message, caplog):
    from messaging.outcomes import message_schedule_retry
    from providers.types import TransientProviderError

    message = make_message(to="+14155552671")
    error = TransientProviderError(
        "Twilio 503: could not reach +14155552671 (alice@example.com)", error_type="provider_5xx"
    )
    with caplog.at_level(logging.DEBUG):
        # Over a minute ahead: the sweeper publishes it, nothing goes to the broker here.
        message_schedule_retry(message=message, error=error, ambiguous=False, at_least_s=3600)
    message.refresh_from_db()
    assert message.next_attempt_at is not None and "+14155552671" in message.last_error_message  # kept on the row
    assert "next attempt in" in caplog.text and "+1415*****71" in caplog.text and "a***@example.com" in caplog.text
    assert "+14155552671" not in caplog.text and "alice@" not in caplog.text
