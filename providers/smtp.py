"""Plain SMTP email through Django's SMTP backend, one message per send, failures sorted by SMTP step.

SMTP tells us only whether the relay took responsibility for a message (the final 250 after
DATA). It sends no receipts and has no look-up, so `fetch_status` reports "accepted-by-relay"
and never moves a message's state, and `has_receipts` is False for reconciliation.

Ambiguous sends. Once every byte of the message, terminating dot included, has left, a timeout
or disconnect before the final reply leaves us not knowing whether the relay queued it. SMTP
offers no way to ask, so `find_send` raises AmbiguousProviderError instead of returning []:
an empty list would license a resend, and a relay does not deduplicate on Message-ID (some
mailbox stores do, most MTAs do not), so the recipient could get the message twice. The cost
is that such a message keeps waiting and finally dead-letters (error type `unknown`, code
`smtp_no_lookup`) even when it was in fact delivered; an operator who accepts a possible
duplicate replays it. We choose a visible dead letter over a silent duplicate (SPEC §6.2).
The Message-ID `<send token@conductor>`, stable across retries, still lets a receiving system
that does deduplicate on it drop a duplicate.

Classification (step = the SMTP command whose reply failed or never came):

| what happened                                      | kind      | error type        |
|----------------------------------------------------|-----------|-------------------|
| connection refused, DNS failure, TLS failure       | transient | connection_error  |
| timeout before the message's final dot was sent   | transient | provider_timeout  |
| disconnect before the message's final dot was sent | transient | connection_error  |
| timeout or disconnect awaiting the final reply     | ambiguous | provider_timeout  |
| 530/534/535/538 (auth), AUTH or STARTTLS missing   | transient | provider_auth     |
| 450, 451 ("try again later": greylisting, throttle)| transient | rate_limited      |
| 421, 452 and other 4xx (server trouble, closing)   | transient | provider_5xx      |
| 5xx to the greeting or EHLO (server refuses us)    | transient | provider_5xx      |
| 5xx to RCPT (SMTPRecipientsRefused in sendmail)    | permanent | invalid_recipient |
| other 5xx (MAIL, DATA, the final reply)            | permanent | rejected          |
| an address Django cannot encode                    | permanent | invalid_recipient |
| an unparsable final reply                          | ambiguous | unknown           |
"""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import smtplib
import threading
from typing import Any, NamedTuple

from django.conf import settings
from django.core.mail import EmailMessage
from django.core.mail.backends.smtp import EmailBackend
from django.core.mail.message import sanitize_address
from django.http import HttpRequest

from providers.base import REQUIRED, Provider
from providers.classify import classify_transport
from providers.http import never_connected
from providers.redact import scrubbed
from providers.types import (
    AmbiguousProviderError,
    ErrorType,
    PermanentProviderError,
    ProviderError,
    ReceiptEvent,
    SendRequest,
    SendResult,
    StatusResult,
    TransientProviderError,
    WebhookSignatureError,
)

logger = logging.getLogger(__name__)

RELAY_ACCEPTED = "accepted-by-relay"
# Right-hand side of our Message-IDs: fixed, so the id depends on the send token alone.
MESSAGE_ID_DOMAIN = "conductor"
AUTH_CODES = frozenset({530, 534, 535, 538})
# "Try again later": greylisting and per-sender throttling answer these (RFC 5321 §4.2.2).
TRY_LATER_CODES = frozenset({450, 451})


class Step(enum.Enum):
    """How far one SMTP transaction got: what a failure can have left behind depends on it."""

    CONNECT = "connect"  # connect, greeting, STARTTLS, AUTH, EHLO
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command, until the 354 go-ahead
    CONTENT = "content"  # sending the message; the relay cannot queue it without the final dot
    FINAL_REPLY = "final_reply"  # every byte is out: the relay may have queued it


class _Progress:
    step = Step.CONNECT


class _Envelope(NamedTuple):
    message_id: str  # ours
    smtp_message_id: str  # the Message-ID header
    recipient: str
    payload: bytes


def message_id_for(token: str) -> str:
    """The Message-ID header of a send: the same for every retry of one logical send."""
    return f"<{token}@{MESSAGE_ID_DOMAIN}>"


class SmtpProvider(Provider):
    name = "smtp"
    channels = frozenset({"email"})
    # A relay's acceptance says nothing about delivery: no state change worth recording.
    status_map = {RELAY_ACCEPTED: None}
    has_receipts = False
    supports_lookup = False
    own_settings = {
        "HOST": REQUIRED,
        "PORT": REQUIRED,
        "FROM_EMAIL": REQUIRED,
        "USERNAME": "",
        "PASSWORD": "",
        "USE_TLS": False,
    }

    def __init__(self, config: dict[str, Any]):
        super().__init__(config)
        # Fail at start-up, not per message, when our own sender address is unusable.
        self.envelope_from = sanitize_address(config["FROM_EMAIL"], settings.DEFAULT_CHARSET)
        # One connection per thread: smtplib connections are not safe to share between threads.
        self._local = threading.local()

    # --- sending ------------------------------------------------------------------------------
    def prepare(self, request: SendRequest) -> _Envelope:
        message_id = message_id_for(request.token)
        try:
            recipient = sanitize_address(request.to, settings.DEFAULT_CHARSET)
        except ValueError as exc:
            raise PermanentProviderError(str(exc), error_type=ErrorType.INVALID_RECIPIENT) from exc
        try:
            payload = self._email(request, message_id).message().as_bytes(linesep="\r\n")
        except ValueError as exc:  # BadHeaderError: a newline in the subject
            raise PermanentProviderError(str(exc), error_type=ErrorType.REJECTED) from exc
        return _Envelope(request.message_id, message_id, recipient, payload)

    def transmit(self, prepared: _Envelope) -> SendResult:
        """One SMTP transaction; a failure is sorted by the step it stopped at (SMTP is not HTTP)."""
        progress = _Progress()
        try:
            connection = self._connection()
            reply = _transmit(connection, self.envelope_from, prepared.recipient, prepared.payload, progress)
        except OSError as exc:  # smtplib's errors, socket errors and timeouts are all OSErrors
            error = _classify(exc, progress.step)
            if _connection_unusable(exc, progress.step):
                self.close(polite=False)
            raise error from exc
        # The relay's reply usually names its queue id: the operator's handle into its logs.
        logger.info(
            "message %s accepted by the SMTP relay as %s: %s",
            prepared.message_id,
            prepared.smtp_message_id,
            scrubbed(str(reply)),  # some relays quote the recipient
        )
        return SendResult(provider_message_id=prepared.smtp_message_id, provider_status=RELAY_ACCEPTED)

    def _email(self, request: SendRequest, message_id: str) -> EmailMessage:
        headers = {
            "Message-ID": message_id,
            "X-Conductor-Message-Id": request.message_id,
            "X-Conductor-Token": request.token,
        }
        # The caller's extra headers (List-Unsubscribe), never in place of ours.
        ours = {name.lower() for name in headers}
        headers |= {name: value for name, value in request.headers.items() if name.lower() not in ours}
        return EmailMessage(
            subject=request.subject,
            body=request.body,
            from_email=self.config["FROM_EMAIL"],
            to=[request.to],
            headers=headers,
        )

    def _backend(self) -> EmailBackend:
        backend = getattr(self._local, "backend", None)
        if backend is None:
            # Every argument explicit: Django's EMAIL_* settings are not this provider's.
            backend = EmailBackend(
                host=self.config["HOST"],
                port=self.config["PORT"],
                username=self.setting("USERNAME"),
                password=self.setting("PASSWORD"),
                use_tls=self.setting("USE_TLS"),
                use_ssl=False,
                timeout=self.config["TIMEOUT_SECONDS"],
                fail_silently=False,
            )
            self._local.backend = backend
        return backend

    def _connection(self) -> smtplib.SMTP:
        """The thread's open connection, checked with RSET; a fresh one if the relay dropped it."""
        backend = self._backend()
        if backend.connection is not None:
            try:
                # Relays close idle connections; RSET also clears any half-done transaction.
                code, _ = backend.connection.rset()
                if code == 250:
                    return backend.connection
            except OSError:
                pass
            self.close(polite=False)
        backend.open()
        backend.connection.ehlo_or_helo_if_needed()
        return backend.connection

    def close(self, *, polite: bool = True) -> None:
        """Close this thread's connection (QUIT first when `polite`)."""
        backend = getattr(self._local, "backend", None)
        if backend is None:
            return
        if not polite:
            if backend.connection is not None:
                backend.connection.close()  # the socket only: QUIT to a hung relay waits a full timeout
                backend.connection = None
            return
        # A broken connection may fail to say goodbye; nothing is left to report by then.
        with contextlib.suppress(OSError):
            backend.close()

    # --- look-ups -----------------------------------------------------------------------------
    def fetch_status(self, provider_message_id: str) -> StatusResult:
        """SMTP has no status look-up: all we ever know is that the relay took it."""
        return StatusResult(provider_message_id, RELAY_ACCEPTED, self.map_status(RELAY_ACCEPTED))

    def find_send(self, request: SendRequest) -> list[SendResult]:
        """SMTP cannot say whether an ambiguous send was queued: see the module docstring."""
        raise AmbiguousProviderError(
            "SMTP has no look-up: whether the relay queued the earlier attempt is unknowable",
            error_type=ErrorType.UNKNOWN,
            code="smtp_no_lookup",
        )

    # --- receipts -----------------------------------------------------------------------------
    def verify(self, request: HttpRequest) -> None:
        raise WebhookSignatureError("SMTP has no receipt webhooks; nothing posted here can be genuine")

    def parse(self, request: HttpRequest) -> list[ReceiptEvent]:
        return []  # never reached: verify() refuses every request


def _transmit(connection: smtplib.SMTP, sender: str, recipient: str, payload: bytes, progress: _Progress) -> str:
    """MAIL, RCPT, DATA step by step (not sendmail) so a failure is known by its step."""
    options = []
    if connection.has_extn("size"):
        options.append(f"SIZE={len(payload)}")  # lets the relay refuse an oversize message up front
    if connection.has_extn("8bitmime") and not payload.isascii():
        options.append("BODY=8BITMIME")
    progress.step = Step.MAIL
    _expect(connection.mail(sender, options), 250)
    progress.step = Step.RCPT
    _expect(connection.rcpt(recipient), 250, 251)
    progress.step = Step.DATA
    connection.putcmd("data")
    _expect(connection.getreply(), 354)
    progress.step = Step.CONTENT
    # smtplib.SMTP.data()'s framing, inlined so the moment the final dot is out is known.
    stuffed = re.sub(rb"(?m)^\.", b"..", payload)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    connection.send(stuffed + b".\r\n")
    progress.step = Step.FINAL_REPLY
    _, text = _expect(connection.getreply(), 250)
    return text.decode("utf-8", "replace")


def _expect(reply: tuple[int, bytes], *codes: int) -> tuple[int, bytes]:
    code, text = reply
    if code not in codes:
        raise smtplib.SMTPResponseException(code, text)
    return reply


def _classify(exc: OSError, step: Step) -> ProviderError:
    if isinstance(exc, smtplib.SMTPResponseException):
        return _classify_reply(exc.smtp_code, _text(exc.smtp_error), step)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        # The relay lacks AUTH or STARTTLS that our settings ask for: our configuration.
        return TransientProviderError(str(exc), error_type=ErrorType.PROVIDER_AUTH, code="not_supported")
    if step is Step.CONNECT and never_connected(exc):
        return classify_transport(exc)  # refused: nothing reached the relay, as for any client
    timed_out = _timed_out(exc)
    if step is Step.FINAL_REPLY:
        code = "timeout" if timed_out else "disconnected"
        return AmbiguousProviderError(
            f"no reply after the message was sent ({exc}); the relay may have queued it",
            error_type=ErrorType.PROVIDER_TIMEOUT,
            code=code,
        )
    if timed_out:
        return TransientProviderError(
            f"timed out at {step.value}: {exc}", error_type=ErrorType.PROVIDER_TIMEOUT, code="timeout"
        )
    return TransientProviderError(f"{step.value}: {exc}", error_type=ErrorType.CONNECTION_ERROR)


def _classify_reply(code: int, text: str, step: Step) -> ProviderError:
    message = f"SMTP {code} at {step.value}: {text}"
    if not 400 <= code < 600:  # unparsable (-1) or a code that makes no sense here
        if step is Step.FINAL_REPLY:
            return AmbiguousProviderError(message, error_type=ErrorType.UNKNOWN, code=str(code))
        return TransientProviderError(message, error_type=ErrorType.UNKNOWN, code=str(code))
    if code in AUTH_CODES:
        # Our credentials, not the message: retry (and dead-letter for replay once fixed).
        return TransientProviderError(message, error_type=ErrorType.PROVIDER_AUTH, code=str(code))
    if code in TRY_LATER_CODES:
        return TransientProviderError(message, error_type=ErrorType.RATE_LIMITED, code=str(code))
    if code < 500 or step is Step.CONNECT:
        # A 5xx greeting refuses us, not this message: another route or a later try may work.
        return TransientProviderError(message, error_type=ErrorType.PROVIDER_5XX, code=str(code))
    if step is Step.RCPT:
        return PermanentProviderError(message, error_type=ErrorType.INVALID_RECIPIENT, code=str(code))
    return PermanentProviderError(message, error_type=ErrorType.REJECTED, code=str(code))


def _connection_unusable(exc: OSError, step: Step) -> bool:
    """After a plain refusal the session is intact (RSET starts afresh); after anything else, not."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return step is Step.CONNECT or exc.smtp_code == 421 or not 200 <= exc.smtp_code < 600
    return True


def _timed_out(exc: BaseException) -> bool:
    # smtplib turns a socket timeout into SMTPServerDisconnected, raised while handling it.
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
