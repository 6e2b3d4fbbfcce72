"""The WSGI entry: receipt webhooks go straight to their view, everything else through Django."""

from __future__ import annotations

import io
import json

import pytest

from conductor_project import wsgi


def call(path: str, method: str = "POST", body: bytes = b"") -> tuple[str, dict[str, str], bytes]:
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": str(len(body)),
        "HTTP_HOST": "testserver",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }
    started: dict[str, object] = {}

    def start_response(status, headers):
        started.update(status=status, headers=dict(headers))

    response = wsgi.application(environ, start_response)
    try:
        content = b"".join(response)
    finally:
        response.close()
    return started["status"], started["headers"], content


@pytest.mark.django_db
def test_a_receipt_webhook_skips_the_middleware_and_is_answered_by_its_view():
    status, headers, content = call("/webhooks/twilio/", body=b"MessageSid=SM1&MessageStatus=delivered")
    assert status.startswith("403")  # unsigned: the view's own refusal
    # Django's middleware would have added these to any response it produced.
    assert "X-Frame-Options" not in headers and "Cross-Origin-Opener-Policy" not in headers
    assert json.loads(content) == {"detail": "invalid signature"}


@pytest.mark.django_db
def test_a_provider_no_route_uses_is_404_and_other_paths_go_through_django():
    assert call("/webhooks/nosuchprovider/")[0].startswith("404")
    status, headers, _ = call("/healthz", method="GET")
    assert status.startswith("200") and headers.get("X-Frame-Options") == "DENY"


@pytest.mark.django_db
def test_a_view_that_breaks_answers_500_so_that_the_provider_retries(monkeypatch):
    def broken(request, provider_name):
        raise RuntimeError("database gone")

    monkeypatch.setattr(wsgi, "provider_webhook", broken)
    status, _, content = call("/webhooks/twilio/")
    assert status.startswith("500") and b"retry" in content
