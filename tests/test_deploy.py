"""Production mode: the settings README's "Deploying to production" documents pass `manage.py check
--deploy` with no warning, each unsafe one stops start-up naming itself, and the admin works over
HTTPS behind a TLS-terminating proxy (real HTTP against gunicorn)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests
from django.test import override_settings

from tests.support.processes import PYTHON, REPO, ManagedProcess, free_port, wait_until

PUBLIC_HOST = "conductor.example.com"
STRONG_SECRET_KEY = "pK7-vR2qLx9_Zt4mWc8hJ3nYb6Fd1Gs5Ae0Uo-iTl7yNq2Xw4Ez9Cr3Vk8Bm6Hj1"
# Variables a developer's shell (or the test run) may hold that would change what is checked.
_CLEARED_PREFIXES = ("TWILIO_", "VONAGE_", "MAILGUN_", "SMTP_", "CONDUCTOR_", "SECURE_", "CSRF_", "SESSION_")
_CLEARED = {"DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "DJANGO_SETTINGS_MODULE", "PROMETHEUS_MULTIPROC_DIR"}


# README's production example: real providers, public URLs, HTTPS behind a proxy.
PRODUCTION_VARIABLES = {
    "CONDUCTOR_MODE": "production",
    "SECRET_KEY": STRONG_SECRET_KEY,
    "ALLOWED_HOSTS": f"{PUBLIC_HOST},web",
    "CSRF_TRUSTED_ORIGINS": f"https://{PUBLIC_HOST}",
    "CONDUCTOR_BEHIND_TLS_PROXY": "true",
    "SECURE_SSL_REDIRECT": "true",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "SECURE_HSTS_PRELOAD": "true",
    "CONDUCTOR_PUBLIC_URL": f"https://{PUBLIC_HOST}",
    "CONDUCTOR_RECEIPTS_URL": f"https://receipts.{PUBLIC_HOST}",
    "CONDUCTOR_METRICS_TOKEN": "a-long-random-metrics-token",
    "CONDUCTOR_ROUTE_SMS": "twilio",
    "CONDUCTOR_ROUTE_WHATSAPP": "twilio",
    "CONDUCTOR_ROUTE_EMAIL": "mailgun",
    "TWILIO_BASE_URL": "https://api.twilio.com",
    "TWILIO_ACCOUNT_SID": "AC0123456789abcdef0123456789abcdef",
    "TWILIO_AUTH_TOKEN": "real-twilio-auth-token",
    "TWILIO_FROM_NUMBER": "+14155550100",
    "MAILGUN_BASE_URL": "https://api.eu.mailgun.net",
    "MAILGUN_API_KEY": "real-mailgun-api-key",
    "MAILGUN_WEBHOOK_SIGNING_KEY": "real-mailgun-signing-key",
    "MAILGUN_DOMAIN": "mg.example.com",
}


def production_env(tmp_path, **changes: str | None) -> dict[str, str]:
    """The process environment with PRODUCTION_VARIABLES and a metrics directory, `changes`
    applied (None: the variable unset)."""
    env = {
        key: value for key, value in os.environ.items() if key not in _CLEARED and not key.startswith(_CLEARED_PREFIXES)
    }
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir(exist_ok=True)
    env.update(PRODUCTION_VARIABLES)
    env["DJANGO_SETTINGS_MODULE"] = "conductor_project.settings.base"
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


# These tests start their own processes with their own settings: the suite's Redis fixtures are not needed.
@pytest.fixture(autouse=True)
def _fresh_provider_state():
    yield


def test_check_deploy_is_clean_with_the_documented_production_settings(tmp_path):
    done = manage(production_env(tmp_path), "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "System check identified no issues (0 silenced).", done.stdout + done.stderr
    assert done.stderr == ""


def test_the_documented_production_settings_are_the_readme_example():
    """README's example block sets every variable these tests use (its values are placeholders)."""
    readme = (REPO / "README.md").read_text()
    example = re.search(r"## Deploying to production.*?```sh\n(.*?)```", readme, re.DOTALL)
    assert example, "README has a 'Deploying to production' section with an sh example"
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", example.group(1), re.MULTILINE))
    expected = {*PRODUCTION_VARIABLES, "PROMETHEUS_MULTIPROC_DIR"}
    assert expected <= documented, sorted(expected - documented)


UNSAFE = {
    # real Twilio credentials, no TWILIO_BASE_URL: the sandbox would take every message
    "twilio-at-the-sandbox": ({"TWILIO_BASE_URL": None}, "conductor.E041", ["TWILIO_BASE_URL"]),
    "sandbox-secrets-at-the-sandbox": (
        {"TWILIO_BASE_URL": None, "TWILIO_AUTH_TOKEN": None},
        "conductor.E045",
        ["TWILIO_BASE_URL", "TWILIO_AUTH_TOKEN"],
    ),
    "sandbox-secret-at-the-real-provider": (
        {"MAILGUN_WEBHOOK_SIGNING_KEY": None},
        "conductor.E023",
        ["MAILGUN_WEBHOOK_SIGNING_KEY"],
    ),
    "public-url-on-loopback": ({"CONDUCTOR_PUBLIC_URL": None}, "conductor.E042", ["CONDUCTOR_PUBLIC_URL"]),
    "public-url-internal-to-compose": (
        {"CONDUCTOR_PUBLIC_URL": "http://web:8000"},
        "conductor.E042",
        ["CONDUCTOR_PUBLIC_URL"],
    ),
    "receipts-url-on-loopback": (
        {"CONDUCTOR_RECEIPTS_URL": "http://localhost:8001"},
        "conductor.E042",
        ["CONDUCTOR_RECEIPTS_URL"],
    ),
    "no-secret-key": ({"SECRET_KEY": None}, "conductor.E043", ["SECRET_KEY"]),
    "compose-default-secret-key": ({"SECRET_KEY": "change-me-in-production"}, "conductor.E043", ["SECRET_KEY"]),
    "short-secret-key": ({"SECRET_KEY": "s3cr3t-but-short"}, "conductor.E043", ["SECRET_KEY"]),
    "debug": ({"DEBUG": "true"}, "conductor.E044", ["DEBUG"]),
    "misspelt-mode": ({"CONDUCTOR_MODE": "prod"}, "conductor.E040", ["CONDUCTOR_MODE"]),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_each_unsafe_production_setting_is_an_error_naming_it(case, tmp_path):
    changes, error_id, names = UNSAFE[case]
    done = manage(production_env(tmp_path, **changes), "check", "--deploy")
    assert done.returncode != 0, done.stdout
    assert error_id in done.stderr, done.stderr
    for name in names:
        assert name in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("url", "unreachable"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://localhost:8001", True),
        ("http://[::1]:8000", True),
        ("http://0.0.0.0:8000", True),
        ("http://10.0.3.7:8000", True),
        ("http://192.168.1.20", True),
        ("http://web:8000", True),
        ("https://conductor.example.com", False),
        ("https://receipts.conductor.example.com:8443/base", False),
        ("http://203.0.113.9:8000", True),  # documentation range: private by Python's reckoning
        ("http://8.8.8.8", False),
    ],
)
def test_receipt_urls_providers_cannot_reach(url, unreachable):
    from conductor_project.checks import is_unreachable_from_outside

    assert is_unreachable_from_outside(url) is unreachable


def test_sandbox_mode_keeps_the_zero_configuration_defaults():
    """`make run` sets none of these: sandbox mode (the default) refuses none of them."""
    from django.core.checks import run_checks

    assert [message for message in run_checks() if message.is_serious()] == []


def test_production_mode_refuses_the_zero_configuration_defaults(settings):
    from django.core.checks import run_checks

    with override_settings(CONDUCTOR_MODE="production", SECRET_KEY=settings.DEV_SECRET_KEY, DEBUG=True):
        errors = sorted({message.id for message in run_checks() if message.is_serious()})
    # Every routed provider is the sandbox's, both receipt URLs are loopback, the key is the fallback.
    assert errors == ["conductor.E041", "conductor.E042", "conductor.E043", "conductor.E044", "conductor.E045"]


def test_the_web_refuses_to_start_in_production_mode_with_an_unsafe_setting(tmp_path):
    env = production_env(tmp_path, SECRET_KEY=None, TWILIO_BASE_URL=None)
    command = [sys.executable, "-c", "import conductor_project.wsgi"]  # what gunicorn imports
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "refuses to start" in done.stderr and "SECRET_KEY" in done.stderr and "TWILIO_BASE_URL" in done.stderr


# --- the admin over HTTPS behind a TLS proxy, through gunicorn ---------------------------------


@pytest.fixture
def production_web(tmp_path, transactional_db):
    """gunicorn with the production settings on the test database, reached as a proxy would:
    plain HTTP on loopback, with the public Host and X-Forwarded-Proto."""
    from django.contrib.auth.models import User
    from django.db import connection

    # Hashed as production settings hash (the test settings' MD5 hasher is not among theirs).
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.PBKDF2PasswordHasher"]):
        User.objects.create_superuser("ops", "ops@example.com", "a-password-for-tests")
    database = connection.settings_dict
    env = production_env(
        tmp_path,
        DATABASE_URL=f"postgres://{database['USER']}@{database['HOST'] or '127.0.0.1'}:{database['PORT'] or 5432}"
        f"/{database['NAME']}",
        CONN_MAX_AGE="0",
        PYTHONUNBUFFERED="1",
    )
    port = free_port()
    web = ManagedProcess(
        "production-web",
        [PYTHON, "-m", "gunicorn", "conductor_project.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1"],
        env,
        tmp_path,
    ).start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(f"{url}/healthz", headers={"Host": "web"}, timeout=1).ok, 30, what="gunicorn")
        yield url
    finally:
        web.stop()
        print(web.log_text()[-3000:])


def _cookies(response: requests.Response) -> dict[str, str]:
    """name -> its whole Set-Cookie line (requests' jar would not send Secure cookies over http)."""
    lines = response.raw.headers.getlist("Set-Cookie")
    return {line.split("=", 1)[0]: line for line in lines}


def _value(set_cookie: str) -> str:
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


def test_the_admin_login_works_over_https_behind_a_proxy(production_web):
    origin = f"https://{PUBLIC_HOST}"
    proxied = {"Host": PUBLIC_HOST, "X-Forwarded-Proto": "https"}

    # Plain HTTP (the proxy did not say https) is redirected; the health probe is not.
    plain = requests.get(f"{production_web}/admin/login/", headers={"Host": PUBLIC_HOST}, allow_redirects=False)
    assert plain.status_code == 301 and plain.headers["Location"] == f"{origin}/admin/login/"
    assert requests.get(f"{production_web}/healthz", headers={"Host": "web"}, allow_redirects=False).status_code == 200

    page = requests.get(f"{production_web}/admin/login/", headers=proxied, allow_redirects=False)
    assert page.status_code == 200
    assert page.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains; preload"
    csrf_cookie = _cookies(page)["csrftoken"]
    assert "Secure" in csrf_cookie
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)

    login = requests.post(
        f"{production_web}/admin/login/?next=/admin/",
        headers={
            **proxied,
            "Origin": origin,
            "Referer": f"{origin}/admin/login/",
            "Cookie": f"csrftoken={_value(csrf_cookie)}",
        },
        data={"username": "ops", "password": "a-password-for-tests", "csrfmiddlewaretoken": token, "next": "/admin/"},
        allow_redirects=False,
    )
    assert login.status_code == 302, login.text[:2000]  # 403 here was the CSRF failure behind a proxy
    assert login.headers["Location"] == "/admin/"
    session_cookie = _cookies(login)["sessionid"]
    assert "Secure" in session_cookie and "HttpOnly" in session_cookie

    admin_index = requests.get(
        f"{production_web}/admin/",
        headers={**proxied, "Cookie": f"sessionid={_value(session_cookie)}"},
        allow_redirects=False,
    )
    assert admin_index.status_code == 200 and "Site administration" in admin_index.text

    # /metrics wants its bearer token (CONDUCTOR_METRICS_TOKEN), over plain HTTP from inside the network.
    assert requests.get(f"{production_web}/metrics", headers={"Host": "web"}).status_code == 401
