"""System checks on the callback delivery settings (messaging.checks: conductor.E060-E062, E071)."""

from __future__ import annotations

import pytest
from django.core.checks import run_checks
from django.test import override_settings


def callback_errors() -> list[str]:
    return sorted(
        error.id
        for error in run_checks()
        if error.id in {"conductor.E060", "conductor.E061", "conductor.E062", "conductor.E071"}
    )


def test_the_shipped_and_the_test_settings_pass():
    assert callback_errors() == []


@pytest.mark.parametrize(
    ("conductor", "expected"),
    [
        # A lease shorter than two timeouts: a request still in flight could be claimed again.
        ({"CALLBACK_TIMEOUT_SECONDS": 10.0, "CALLBACK_LEASE_SECONDS": 15.0}, ["conductor.E061"]),
        ({"CALLBACK_TIMEOUT_SECONDS": 0.0}, ["conductor.E060"]),
        ({"CALLBACK_CONCURRENCY_PER_ENDPOINT": 0}, []),  # conductor.E018: a whole number >= 1
        ({"CALLBACK_CONCURRENCY": 8, "CALLBACK_CONCURRENCY_PER_ENDPOINT": 16}, ["conductor.E071"]),
        ({"CALLBACK_BACKOFF_BASE_SECONDS": 0.0}, ["conductor.E060"]),
        ({"CALLBACK_BACKOFF_BASE_SECONDS": 60.0, "CALLBACK_BACKOFF_MAX_SECONDS": 30.0}, ["conductor.E062"]),
        ({"CALLBACK_RETRY_WINDOW_SECONDS": 0.0}, ["conductor.E060"]),
    ],
)
def test_callback_settings_that_cannot_work_are_errors(settings, conductor, expected):
    with override_settings(CONDUCTOR={**settings.CONDUCTOR, **conductor}):
        assert callback_errors() == expected
