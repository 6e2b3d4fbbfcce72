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
