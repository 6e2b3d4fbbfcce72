"""System checks reject Conductor settings that cannot work, naming the key (each layer checks its
own keys; the wiring rejects keys no layer owns)."""

import io
import os
import subprocess
import sys

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings


def check_conductor_settings():
    """Every error of every layer's settings checks (deployment-only checks aside)."""
    return [error for error in run_checks() if error.id.startswith("conductor.")]


def ids(errors):
    return sorted(error.id for error in errors)


def test_the_shipped_settings_pass():
    assert check_conductor_settings() == []


@override_settings(CONDUCTOR={"ROUTS": {}})
def test_a_misspelt_key_is_an_error():
    assert ids(check_conductor_settings()) == ["conductor.E001"]


@override_settings(CONDUCTOR={"ROUTES": {"sms": ["twillio"], "email": ["twilio"]}})
def test_routes_must_name_known_providers_that_send_the_channel():
    assert ids(check_conductor_settings()) == ["conductor.E003", "conductor.E011"]


@override_settings(CONDUCTOR={"RETRY_POLICIES": {"critical": {"max_attempt": 3}}})
def test_retry_policy_fields_are_checked():
    assert ids(check_conductor_settings()) == ["conductor.E006"]


@override_settings(CONDUCTOR={"CIRCUIT_BREAKER": {"open_secs": 5}})
def test_circuit_breaker_fields_are_checked():
    assert ids(check_conductor_settings()) == ["conductor.E009"]


@override_settings(CONDUCTOR={"CIRCUIT_BREAKER": {"failure_rate_threshold": 2.0}})
def test_circuit_breaker_values_that_cannot_work_are_errors():
    assert "conductor.E010" in ids(check_conductor_settings())


@override_settings(CONDUCTOR={"CATEGORY_POLICIES": {"otp": {"replay_deadline": "extend"}}})
def test_the_replay_deadline_policy_is_checked():
    assert ids(check_conductor_settings()) == ["conductor.E012"]


@override_settings(CONDUCTOR={"ANOMALY": {"min_sample": 10}})
def test_anomaly_detector_fields_are_checked():
    assert ids(check_conductor_settings()) == ["conductor.E013"]


@override_settings(CONDUCTOR={"ANOMALY": {"bucket_seconds": 60, "windows_seconds": [90, 3600]}})
def test_anomaly_windows_must_be_whole_buckets():
    [error] = check_conductor_settings()
    assert error.id == "conductor.E013" and "multiples of bucket_seconds" in error.msg


@override_settings(CONDUCTOR={"RECEIPT_TIMEOUT_SECONDS": {"fax": 60, "sms": 0}})
def test_receipt_timeouts_are_checked():
    assert ids(check_conductor_settings()) == ["conductor.E014", "conductor.E014"]


@override_settings(CONDUCTOR={"SMS_HELP_REPLY": "x" * 1601})
def test_a_help_reply_longer_than_an_sms_is_an_error():
    assert ids(check_conductor_settings()) == ["conductor.E080"]


@pytest.mark.parametrize("hours", [-1, 25, 24.5])
def test_the_whatsapp_session_window_is_0_to_24_hours(hours):
    with override_settings(CONDUCTOR={"WHATSAPP_SESSION_WINDOW_HOURS": hours}):
        assert ids(check_conductor_settings()) == ["conductor.E081"]
    with override_settings(CONDUCTOR={"WHATSAPP_SESSION_WINDOW_HOURS": 0}):
        assert ids(check_conductor_settings()) == []


@override_settings(CONDUCTOR={"SMS_HELP_REPLY": 5})
def test_a_help_reply_must_be_text():
    assert [error.id for error in check_conductor_settings() if "SMS_HELP_REPLY" in error.msg]


@override_settings(CONDUCTOR={"BULK_BATCH_SIZE": 0, "BULK_SEND_CONCURRENCY": "100"})
def test_bulk_batch_settings_must_be_positive_whole_numbers():
    assert ids(check_conductor_settings()) == ["conductor.E018", "conductor.E018"]


@override_settings(CONDUCTOR={"DISPATCH_LEASE_SECONDS": "60", "ROUTES": ["twilio"], "ALERT_WEBHOOK_URL": 5})
def test_each_layers_keys_have_their_defaults_type():
    errors = check_conductor_settings()
    assert ids(errors) == ["conductor.E021"] * 3
    assert {error.msg.split("]")[0] for error in errors} == {
        "CONDUCTOR['DISPATCH_LEASE_SECONDS'",
        "CONDUCTOR['ROUTES'",
        "CONDUCTOR['ALERT_WEBHOOK_URL'",
    }


@override_settings(CONDUCTOR={"SWEEP_BATCH_SIZE": 0, "RECONCILE_BATCH_SIZE": 2.5})
def test_sizes_of_every_layer_are_whole_numbers():
    assert ids(check_conductor_settings()) == ["conductor.E018", "conductor.E018"]


def _providers_with(name, **changes):
    from django.conf import settings

    providers = {provider: dict(conf) for provider, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers[name].update(changes)
    return providers


def test_an_unknown_key_in_a_provider_entry_is_an_error():
    with override_settings(CONDUCTOR_PROVIDERS=_providers_with("vonage", LOOKUP_SETTLE_SECOND=30.0)):
        [error] = check_conductor_settings()
    assert error.id == "conductor.E019" and "'vonage'" in error.msg and "'LOOKUP_SETTLE_SECOND'" in error.msg


def test_a_missing_required_key_in_a_provider_entry_is_an_error():
    providers = _providers_with("twilio")
    del providers["twilio"]["AUTH_TOKEN"]
    with override_settings(CONDUCTOR_PROVIDERS=providers):
        [error] = check_conductor_settings()
    assert error.id == "conductor.E020" and "'twilio'" in error.msg and "'AUTH_TOKEN'" in error.msg


def test_optional_provider_keys_may_be_left_out():
    providers = _providers_with("smtp")
    for key in ("USERNAME", "PASSWORD", "USE_TLS", "RATE_LIMIT_PER_SECOND"):
        del providers["smtp"][key]
    with override_settings(CONDUCTOR_PROVIDERS=providers):
        assert check_conductor_settings() == []


@pytest.mark.parametrize("value", [0, -5.0, "300", None, True, float("inf")])
def test_the_mailgun_webhook_window_must_be_a_positive_number(value):
    with override_settings(CONDUCTOR_PROVIDERS=_providers_with("mailgun", WEBHOOK_MAX_AGE_SECONDS=value)):
        [error] = check_conductor_settings()
    assert error.id == "conductor.E022" and "'WEBHOOK_MAX_AGE_SECONDS'" in error.msg


def test_the_mailgun_webhook_window_can_be_set():
    with override_settings(CONDUCTOR_PROVIDERS=_providers_with("mailgun", WEBHOOK_MAX_AGE_SECONDS=60)):
        assert check_conductor_settings() == []


# A provider pointed anywhere but the sandbox must not keep the sandbox's (public) secrets.
SANDBOX_SECRET_SETTINGS = {
    "twilio": ["AUTH_TOKEN"],
    "vonage": ["API_SECRET", "SIGNATURE_SECRET"],
    "mailgun": ["API_KEY", "WEBHOOK_SIGNING_KEY"],
}
REAL_BASE_URLS = {"twilio": "https://api.twilio.com", "vonage": "", "mailgun": "https://api.eu.mailgun.net"}


@pytest.mark.parametrize("provider", sorted(SANDBOX_SECRET_SETTINGS))
def test_sandbox_secrets_outside_the_sandbox_stop_start_up_naming_each_setting(provider):
    with override_settings(CONDUCTOR_PROVIDERS=_providers_with(provider, BASE_URL=REAL_BASE_URLS[provider])):
        errors = check_conductor_settings()
    assert ids(errors) == ["conductor.E023"] * len(SANDBOX_SECRET_SETTINGS[provider])
    for error, key in zip(errors, SANDBOX_SECRET_SETTINGS[provider], strict=True):
        assert f"CONDUCTOR_PROVIDERS[{provider!r}][{key!r}] is still the sandbox's default" in error.msg
        assert f"{provider.upper()}_{key}" in error.hint


def test_real_secrets_outside_the_sandbox_pass():
    providers = _providers_with("vonage", BASE_URL="", API_SECRET="real-secret", SIGNATURE_SECRET="real-signing")
    with override_settings(CONDUCTOR_PROVIDERS=providers):
        assert check_conductor_settings() == []


def test_the_sandbox_is_recognised_by_its_url_with_or_without_a_slash(settings):
    providers = _providers_with("twilio", BASE_URL=settings.SANDBOX_URL + "/")
    with override_settings(CONDUCTOR_PROVIDERS=providers):
        assert check_conductor_settings() == []
    with override_settings(SANDBOX_URL="http://sandbox.internal:8025"):
        assert "conductor.E023" in ids(check_conductor_settings())


def test_the_sandbox_secrets_are_the_shipped_defaults(settings):
    from providers.conf import SANDBOX_SECRETS

    for provider, keys in SANDBOX_SECRET_SETTINGS.items():
        assert sorted(SANDBOX_SECRETS[provider]) == sorted(keys)
        assert {key: settings.CONDUCTOR_PROVIDERS[provider][key] for key in keys} == SANDBOX_SECRETS[provider]


@pytest.mark.django_db
@pytest.mark.parametrize("command", [("check",), ("check", "--deploy"), ("migrate", "--check")])
def test_check_and_migrate_refuse_to_start_with_a_sandbox_secret(command):
    providers = _providers_with("twilio", BASE_URL="https://api.twilio.com")
    with override_settings(CONDUCTOR_PROVIDERS=providers), pytest.raises(SystemCheckError, match="conductor.E023"):
        # migrate runs the checks itself (call_command skips them unless told not to); check is them.
        options = {"skip_checks": False} if command[0] == "migrate" else {}
        call_command(*command, **options, stdout=io.StringIO(), stderr=io.StringIO())


@pytest.mark.parametrize(
    "command",
    [
        ["-c", "import conductor_project.wsgi"],  # what gunicorn imports in each web process
        ["-m", "celery", "-A", "conductor_project", "worker", "-c", "1", "-Q", "nothing", "--without-mingle"],
        ["-m", "celery", "-A", "conductor_project", "beat", "-S", "celery.beat:PersistentScheduler", "-s", "{tmp}/s"],
    ],
    ids=["web", "worker", "beat"],
)
def test_web_workers_and_beat_refuse_to_start_with_a_real_provider_and_a_sandbox_secret(command, tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "conductor_project.settings.base",
        "TWILIO_BASE_URL": "https://api.twilio.com",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/13",
    }
    command = [part.replace("{tmp}", str(tmp_path)) for part in command]
    done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "conductor.E023" in done.stderr and "TWILIO_AUTH_TOKEN" in done.stderr


@pytest.mark.parametrize(
    "conductor, expected",
    [
        ({"CALLBACK_TIMEOUT_SECONDS": 0.0}, ["conductor.E060"]),
        ({"CALLBACK_SECRET_OVERLAP_SECONDS": -1.0}, ["conductor.E060"]),
        ({"CALLBACK_TIMEOUT_SECONDS": 30.0, "CALLBACK_LEASE_SECONDS": 30.0}, ["conductor.E061"]),
        ({"CALLBACK_BACKOFF_BASE_SECONDS": 60.0, "CALLBACK_BACKOFF_MAX_SECONDS": 10.0}, ["conductor.E062"]),
        ({"CALLBACK_DISABLE_AFTER_SECONDS": 0.0}, ["conductor.E063"]),
        ({"CALLBACK_RETRY_WINDOW_SECONDS": "1d"}, ["conductor.E021"]),
        ({"CALLBACK_CONCURRENCY_PER_ENDPOINT": 0}, ["conductor.E018"]),
    ],
)
def test_callback_settings_that_cannot_work_are_errors(conductor, expected):
    with override_settings(CONDUCTOR=conductor):
        assert ids(check_conductor_settings()) == expected


@pytest.mark.parametrize(
    "conductor, expected",
    [
        ({"QUIET_HOURS": {"default": {"start": "21:00", "end": "08:00"}, "otp": None}}, []),
        ({"QUIET_HOURS": {"default": {"start": "21:00", "end": "8"}}}, ["conductor.E090"]),
        ({"QUIET_HOURS": {"default": {"start": "21:00", "end": "21:00"}}}, ["conductor.E090"]),
        ({"QUIET_HOURS": {"marketing": {"start": "21:00", "end": "08:00", "critical": True}}}, ["conductor.E090"]),
        (
            {"QUIET_HOURS": {"default": {"start": "21:00", "end": "08:00", "exempt_priorities": ["vip"]}}},
            ["conductor.E090"],
        ),
        ({"QUIET_HOURS_EXEMPT_PRIORITIES": ["critical", "urgent"]}, ["conductor.E091"]),
        ({"QUIET_HOURS": []}, ["conductor.E021"]),
    ],
)
def test_quiet_hours_settings_are_checked(conductor, expected):
    with override_settings(CONDUCTOR=conductor):
        assert ids(check_conductor_settings()) == expected
