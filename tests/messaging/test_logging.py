"""Recipients are masked in logs."""

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
