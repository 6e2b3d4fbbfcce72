"""System checks reject Conductor settings that cannot work, naming the key (each layer checks its
own keys; the wiring rejects keys no layer owns)."""

from django.core.checks import run_checks
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
