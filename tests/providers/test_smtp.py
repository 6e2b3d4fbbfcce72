"""SMTP adapter: the provider contract in SMTP terms, against a real local SMTP server."""

from __future__ import annotations

import dataclasses
from urllib.parse import urlsplit

import pytest
from django.test import RequestFactory

from providers.conf import provider_config
from providers.registry import get_provider, reset_provider_cache
from providers.smtp import SmtpProvider, message_id_for
from providers.types import (
    AmbiguousProviderError,
    PermanentProviderError,
    SendRequest,
    TransientProviderError,
    WebhookSignatureError,
)
from tests.providers.contract import ProviderContract, send_request
from tests.support.smtp_server import SmtpTestServer

# Short, so the timeout tests are quick; the local server answers in milliseconds otherwise.
TIMEOUT = 1.0


def email_request(to: str, body: str = "contract test", subject: str = "Your code") -> SendRequest:
    return dataclasses.replace(send_request(to, body=body, channel="email"), subject=subject)


@pytest.fixture(scope="module")
def running_smtp_server():
    server = SmtpTestServer().start()
    yield server
    server.stop()  # runs whatever the tests did


@pytest.fixture
def smtp_server(running_smtp_server):
    """The module's server with no faults, no messages and no open sessions."""
    running_smtp_server.reset()
    return running_smtp_server


@pytest.fixture
def smtp_settings(settings, smtp_server):
    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["smtp"].update(HOST=smtp_server.host, PORT=smtp_server.port, TIMEOUT_SECONDS=TIMEOUT)
    settings.CONDUCTOR_PROVIDERS = providers
    reset_provider_cache()
    yield providers["smtp"]
    reset_provider_cache()


@pytest.fixture
def provider(smtp_settings):
    adapter = get_provider("smtp")
    yield adapter
    adapter.close()


@pytest.fixture
def provider_with(smtp_settings):
    """An adapter with some settings changed (host, port, credentials)."""
    made: list[SmtpProvider] = []

    def build(**changes) -> SmtpProvider:
        made.append(SmtpProvider({**provider_config("smtp"), **changes}))
        return made[-1]

    yield build
    for adapter in made:
        adapter.close()


@pytest.fixture
def provider_at(provider_with):
    def build(url: str) -> SmtpProvider:
        parts = urlsplit(url)
        return provider_with(HOST=parts.hostname, PORT=parts.port)

    return build


@pytest.fixture
def recipient():
    return "alice@example.com"


class TestSmtpContract(ProviderContract):
    """The sandbox's HTTP faults become the SMTP server's replies; a relay's answers are SMTP codes."""

    invalid_recipient = "nobody@example.com"

    def test_send_is_accepted_and_attributed(self, provider, smtp_server, recipient):
        request = email_request(recipient, body="Your code is 123456.", subject="Sign-in code")
        result = provider.send(request)
        [received] = smtp_server.received(message_id=request.message_id)
        assert received.rcpt_tos == (recipient,) and received.mail_from == "no-reply@example.com"
        assert received.message_id == f"<{request.token}@conductor>" == result.provider_message_id
        assert received.header("X-Conductor-Token") == request.token
        assert received.header("Subject") == "Sign-in code" and received.header("To") == recipient
        assert received.body.strip() == "Your code is 123456."
        assert result.provider_status == "accepted-by-relay"

    def test_a_5xx_is_transient(self, provider, smtp_server, recipient):
        """SMTP's 5xx is final; its "server trouble, try later" is a 4xx such as 452."""
        smtp_server.fail("MAIL", "452 4.3.1 Insufficient system storage")
        with pytest.raises(TransientProviderError) as caught:
            provider.send(email_request(recipient))
        assert caught.value.error_type == "provider_5xx" and caught.value.code == "452"
        assert smtp_server.messages == []

    def test_an_outage_is_transient(self, provider, smtp_server, recipient):
        """A relay going down answers 421 and hangs up; the next send opens a new connection."""
        smtp_server.fail("MAIL", "421 4.3.2 Service shutting down", close=True)
        with pytest.raises(TransientProviderError) as caught:
            provider.send(email_request(recipient))
        assert caught.value.error_type == "provider_5xx" and caught.value.code == "421"
        smtp_server.reset()
        request = email_request(recipient)
        provider.send(request)
        assert len(smtp_server.received(message_id=request.message_id)) == 1

    def test_a_429_is_transient_and_carries_retry_after(self, provider, smtp_server, recipient):
        """SMTP's "try again later" is 450/451, with no Retry-After: our backoff decides."""
        smtp_server.fail("RCPT", "451 4.7.1 Greylisted, try again later")
        with pytest.raises(TransientProviderError) as caught:
            provider.send(email_request(recipient))
        assert caught.value.error_type == "rate_limited" and caught.value.retry_after is None
        assert smtp_server.messages == []

    def test_an_invalid_recipient_is_permanent(self, provider, smtp_server):
        smtp_server.refuse_recipient(self.invalid_recipient)
        with pytest.raises(PermanentProviderError) as caught:
            provider.send(email_request(self.invalid_recipient))
        assert caught.value.error_type == "invalid_recipient" and caught.value.code == "550"
        assert smtp_server.messages == []

    def test_a_timeout_after_sending_is_ambiguous_and_the_look_up_finds_it(self, provider, smtp_server, recipient):
        """The relay stores the message and never answers. SMTP has no look-up, so find_send
        reports the outcome unknown (never [], which would license a duplicate)."""
        smtp_server.hang_after_data(TIMEOUT + 1.0)
        request = email_request(recipient)
        with pytest.raises(AmbiguousProviderError) as caught:
            provider.send(request)
        assert caught.value.error_type == "provider_timeout"
        [stored] = smtp_server.received(message_id=request.message_id)
        assert stored.message_id == message_id_for(request.token)
        with pytest.raises(AmbiguousProviderError) as unknown:
            provider.find_send(request)
        assert unknown.value.code == "smtp_no_lookup"

    def test_a_look_up_of_a_send_that_never_happened_finds_nothing(self, provider, smtp_server, recipient):
        """SMTP cannot tell "never sent" from "queued": the look-up says unknown, not []."""
        with pytest.raises(AmbiguousProviderError):
            provider.find_send(email_request(recipient, body="never sent"))

    def test_status_look_up_follows_the_receipt(self):
        pytest.skip("SMTP has no receipts and no status look-up (see test_fetch_status_reports_the_relay_only)")

    def test_a_signed_webhook_parses_and_a_forged_one_is_refused(self, provider):
        """There are no SMTP webhooks, so nothing posted can be genuine: every request is refused."""
        request = RequestFactory().post("/webhooks/smtp/", data={"status": "delivered"})
        with pytest.raises(WebhookSignatureError):
            provider.parse_webhook(request)


@pytest.mark.parametrize(
    ("command", "reply", "kind", "error_type"),
    [
        ("MAIL", "451 4.3.0 Local error, try again later", TransientProviderError, "rate_limited"),
        ("RCPT", "450 4.2.1 Mailbox busy", TransientProviderError, "rate_limited"),
        ("RCPT", "452 4.5.3 Too many recipients", TransientProviderError, "provider_5xx"),
        ("DATA", "452 4.3.1 Insufficient system storage", TransientProviderError, "provider_5xx"),
        ("MAIL", "530 5.7.0 Authentication required", TransientProviderError, "provider_auth"),
        ("MAIL", "553 5.7.1 Sender address rejected", PermanentProviderError, "rejected"),
        ("RCPT", "550 5.1.1 No such user", PermanentProviderError, "invalid_recipient"),
        ("RCPT", "553 5.1.3 Bad recipient address syntax", PermanentProviderError, "invalid_recipient"),
        ("DATA", "554 5.7.1 Message rejected as spam", PermanentProviderError, "rejected"),
        ("DATA", "552 5.3.4 Message too big", PermanentProviderError, "rejected"),
    ],
)
def test_relay_replies_are_classified_by_code_and_step(
    provider, smtp_server, recipient, command, reply, kind, error_type
):
    smtp_server.fail(command, reply)
    with pytest.raises(kind) as caught:
        provider.send(email_request(recipient))
    assert type(caught.value) is kind
    assert caught.value.error_type == error_type and caught.value.code == reply[:3]
    assert smtp_server.messages == []


def test_a_timeout_before_the_message_was_sent_is_transient(provider, smtp_server, recipient):
    smtp_server.slow_down(TIMEOUT + 0.5)
    with pytest.raises(TransientProviderError) as caught:
        provider.send(email_request(recipient))
    assert caught.value.error_type == "provider_timeout"
    assert smtp_server.messages == []


def test_a_slow_relay_within_the_timeout_accepts(provider, smtp_server, recipient):
    smtp_server.slow_down(0.1)
    request = email_request(recipient)
    provider.send(request)
    assert len(smtp_server.received(message_id=request.message_id)) == 1


def test_a_wrong_password_is_transient_provider_auth(provider_with, smtp_server, recipient):
    smtp_server.require_credentials("conductor", "s3cret")
    with pytest.raises(TransientProviderError) as caught:
        provider_with(USERNAME="conductor", PASSWORD="wrong").send(email_request(recipient))
    assert caught.value.error_type == "provider_auth" and caught.value.code == "535"
    request = email_request(recipient)
    provider_with(USERNAME="conductor", PASSWORD="s3cret").send(request)
    assert [m.message_id for m in smtp_server.messages] == [message_id_for(request.token)]


def test_one_connection_carries_many_sends(provider, smtp_server, recipient):
    for _ in range(3):
        provider.send(email_request(recipient))
    assert len({m.peer for m in smtp_server.messages}) == 1


def test_the_connection_survives_a_refused_recipient(provider, smtp_server, recipient):
    smtp_server.refuse_recipient("gone@example.com")
    provider.send(email_request(recipient))
    with pytest.raises(PermanentProviderError):
        provider.send(email_request("gone@example.com"))
    provider.send(email_request(recipient))
    first, second = smtp_server.messages
    assert first.peer == second.peer


def test_a_connection_the_relay_dropped_is_reopened(provider, smtp_server, recipient):
    provider.send(email_request(recipient))
    smtp_server.drop_connections()  # as a relay does with idle clients
    provider.send(email_request(recipient))
    first, second = smtp_server.messages
    assert first.peer != second.peer


def test_every_retry_of_one_send_carries_the_same_message_id(provider, smtp_server, recipient):
    """A receiving system that deduplicates on Message-ID can drop a duplicate; a replay is new."""
    request = email_request(recipient)
    provider.send(request)
    provider.send(request)
    replayed = dataclasses.replace(request, token=request.message_id + ".2")
    provider.send(replayed)
    ids = [m.message_id for m in smtp_server.received(message_id=request.message_id)]
    assert ids == [f"<{request.token}@conductor>"] * 2 + [f"<{replayed.token}@conductor>"]


def test_the_body_arrives_intact(provider, smtp_server, recipient):
    """Dot-stuffing (a line that is a lone dot) and non-ASCII text survive the wire."""
    body = "Line one\n.\n.leading dot\nGrüße, Zoë — ✓"
    request = email_request(recipient, body=body, subject="Grüße")
    provider.send(request)
    [received] = smtp_server.received(message_id=request.message_id)
    assert received.body.rstrip("\n") == body and received.header("Subject") == "Grüße"


def test_an_address_that_cannot_be_encoded_is_permanent_and_never_sent(provider, smtp_server):
    with pytest.raises(PermanentProviderError) as caught:
        provider.send(email_request("a@b@c"))
    assert caught.value.error_type == "invalid_recipient"
    assert smtp_server.messages == []


def test_a_newline_in_the_subject_is_rejected_before_sending(provider, smtp_server, recipient):
    with pytest.raises(PermanentProviderError) as caught:
        provider.send(email_request(recipient, subject="Hi\nBcc: everyone@example.com"))
    assert caught.value.error_type == "rejected"
    assert smtp_server.messages == []


def test_fetch_status_reports_the_relay_only(provider):
    status = provider.fetch_status("<m.1@conductor>")
    assert status.provider_status == "accepted-by-relay" and status.state is None
    assert SmtpProvider.has_receipts is False and SmtpProvider.channels == {"email"}


def test_the_relays_reply_is_logged_with_the_recipient_masked(provider, smtp_server, recipient, caplog):
    import logging

    smtp_server.fail("DATA", "250 2.0.0 Ok: queued as Q7 for <alice@example.com>")  # some relays say
    with caplog.at_level(logging.INFO, logger="providers.smtp"):
        provider.send(email_request(recipient))
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name == "providers.smtp")  # not the test relay's
    assert "queued as Q7 for <a***@example.com>" in ours and "alice@" not in ours


def test_extra_headers_reach_the_relay(provider, smtp_server):
    """List-Unsubscribe (RFC 8058) and the like travel in SendRequest.headers; ours still win."""
    url = "https://conductor.example.com/unsubscribe/abc:def/"
    headers = {
        "List-Unsubscribe": f"<{url}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Message-ID": "<not-ours@example.com>",
    }
    request = dataclasses.replace(email_request("ada@example.com"), headers=headers)
    provider.send(request)
    [received] = smtp_server.received(message_id=request.message_id)
    assert received.header("List-Unsubscribe") == f"<{url}>"
    assert received.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    assert received.message_id == message_id_for(request.token)  # a caller cannot replace our Message-ID
    plain = email_request("ada@example.com")
    provider.send(plain)
    [received] = smtp_server.received(message_id=plain.message_id)
    assert received.header("List-Unsubscribe") is None
