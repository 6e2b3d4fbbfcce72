"""Recipients are masked in logs."""

from messaging.logging import masked


def test_phone_numbers_keep_only_country_prefix_and_last_digits():
    assert masked("+14155552671") == "+1415*****71"


def test_email_keeps_first_letter_and_domain():
    assert masked("alice@example.com") == "a***@example.com"


def test_short_and_empty_values():
    assert masked("") == ""
    assert "*" in masked("+12345")
