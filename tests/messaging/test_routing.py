"""Retry policies and full-jitter backoff (pure functions, seeded RNG)."""

import random

import pytest
from django.test import override_settings

from messaging.routing import DEFAULT_RETRY_POLICIES, RetryPolicy, backoff_delay, queue_name, retry_policy_for


def test_defaults_match_the_spec_table():
    # The spec's table, and what a replay does to the deadline: a 2FA code's deadline holds.
    assert DEFAULT_RETRY_POLICIES["critical"] == RetryPolicy(6, 1.0, 10.0, 300, 86400, "keep")
    assert DEFAULT_RETRY_POLICIES["transactional"] == RetryPolicy(10, 5.0, 600.0, 86400, 14 * 86400, "renew")
    assert DEFAULT_RETRY_POLICIES["bulk"] == RetryPolicy(12, 60.0, 7200.0, 72 * 3600, 30 * 86400, "renew")


def test_queue_names():
    assert queue_name("sms", "critical") == "sms.critical"
    assert queue_name("email", "bulk") == "email.bulk"


@pytest.mark.parametrize("failures,ceiling", [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (40, 10.0)])
def test_full_jitter_stays_within_the_exponential_ceiling(failures, ceiling):
    policy = DEFAULT_RETRY_POLICIES["critical"]
    rng = random.Random(1)
    delays = [backoff_delay(policy, failures, rng) for _ in range(2000)]
    assert min(delays) >= 0
    assert max(delays) <= ceiling
    # Full jitter spreads over the whole range, not just near the ceiling.
    assert min(delays) < ceiling * 0.05 and max(delays) > ceiling * 0.95


def test_huge_attempt_numbers_do_not_overflow():
    assert 0 <= backoff_delay(DEFAULT_RETRY_POLICIES["bulk"], 10_000, random.Random(2)) <= 7200


@override_settings(
    CONDUCTOR={
        "RETRY_POLICIES": {"critical": {"max_attempts": 3}},
        "CATEGORY_POLICIES": {"otp": {"ttl_seconds": 60}},
    }
)
def test_settings_override_per_priority_then_per_category():
    assert retry_policy_for("critical").max_attempts == 3
    otp = retry_policy_for("critical", "otp")
    assert otp.max_attempts == 3 and otp.ttl_seconds == 60
    assert retry_policy_for("bulk", "otp").max_attempts == 12
