"""A real SMTP server on 127.0.0.1 for tests (aiosmtpd): records what arrived, injects faults at runtime."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

ACCEPTED = "250 OK"


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server took: its envelope, its parsed headers and body, and the connection."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    peer: tuple[str, int]  # the client's address and port: one per TCP connection
    parsed: EmailMessage = field(repr=False)

    def header(self, name: str) -> str | None:
        value = self.parsed[name]
        return None if value is None else str(value)

    @property
    def body(self) -> str:
        # The wire's CRLF line ends survive parsing an 8bit body; tests compare with "\n" text.
        return self.parsed.get_content().replace("\r\n", "\n")

    @property
    def message_id(self) -> str | None:
        return self.header("Message-ID")


@dataclass
class Faults:
    """What the server does instead of accepting; changed by the control methods below."""

    replies: dict[str, str] = field(default_factory=dict)  # command -> reply instead of accepting
    close_after: set[str] = field(default_factory=set)  # commands after whose reply it hangs up
    refused_recipients: dict[str, str] = field(default_factory=dict)  # address -> RCPT reply
    hang_after_data_seconds: float = 0.0  # store the message, then wait this long before the 250
    latency_seconds: float = 0.0  # before answering MAIL, RCPT and DATA
    credentials: tuple[str, str] | None = None  # None: any AUTH succeeds


class _Handler:
    """aiosmtpd hooks: each consults the current faults, then accepts as aiosmtpd would."""

    def __init__(self, server: SmtpTestServer):
        self.server = server

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.server._track(smtp)
        refusal = await self._fault(smtp, "MAIL")
        if refusal:
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return ACCEPTED

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = await self._fault(smtp, "RCPT")
        if refusal:
            return refusal
        refused = self.server.faults.refused_recipients.get(address.lower())
        if refused:
            return refused
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return ACCEPTED

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        refusal = await self._fault(smtp, "DATA")
        if refusal:
            return refusal
        number = self.server._store(envelope, session)
        hang = self.server.faults.hang_after_data_seconds
        if hang:
            # Stored but unanswered: the client cannot know it was queued (the ambiguous case).
            await asyncio.sleep(hang)
        return f"250 2.0.0 Ok: queued as Q{number}"

    async def _fault(self, smtp: SMTP, command: str) -> str | None:
        faults = self.server.faults
        if faults.latency_seconds:
            await asyncio.sleep(faults.latency_seconds)
        reply = faults.replies.get(command)
        if reply and command in faults.close_after:
            # Runs after aiosmtpd has written the reply (nothing yields in between): reply, then hang up.
            smtp.loop.call_soon(_close, smtp)
        return reply


class _Controller(Controller):
    def _trigger_server(self) -> None:
        # Bound to port 0: learn the port the OS picked before aiosmtpd connects to it.
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpTestServer:
    """Start, fault, inspect, stop. Faults apply to the next command the server answers."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.faults = Faults()
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._sessions: set[SMTP] = set()
        self._controller = _Controller(
            _Handler(self),
            hostname=self.host,
            port=0,
            server_hostname="smtp.test",  # no reverse DNS look-up at start
            authenticator=self._authenticate,
            auth_require_tls=False,  # loopback only: lets the client try AUTH without STARTTLS
        )

    @property
    def port(self) -> int:
        return self._controller.port

    def start(self) -> SmtpTestServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()  # cancels every session, hanging ones included

    # --- what arrived -------------------------------------------------------------------------
    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    def received(self, *, message_id: str) -> list[ReceivedMessage]:
        """Messages carrying our X-Conductor-Message-Id (the id we gave the send)."""
        return [m for m in self.messages if m.header("X-Conductor-Message-Id") == message_id]

    # --- fault controls -----------------------------------------------------------------------
    def fail(self, command: str, reply: str, *, close: bool = False) -> None:
        """Answer `command` (MAIL, RCPT or DATA) with `reply`; with `close`, hang up after it."""
        self.faults.replies[command.upper()] = reply
        if close:
            self.faults.close_after.add(command.upper())

    def refuse_recipient(self, address: str, reply: str = "550 5.1.1 Recipient address rejected: no such user") -> None:
        self.faults.refused_recipients[address.lower()] = reply

    def hang_after_data(self, seconds: float) -> None:
        self.faults.hang_after_data_seconds = seconds

    def slow_down(self, seconds: float) -> None:
        self.faults.latency_seconds = seconds

    def require_credentials(self, username: str, password: str) -> None:
        self.faults.credentials = (username, password)

    def drop_connections(self) -> None:
        """Hang up on every client, as a relay does with idle connections."""
        with self._lock:
            sessions, self._sessions = list(self._sessions), set()

        async def close_all() -> None:
            for smtp in sessions:
                _close(smtp)

        asyncio.run_coroutine_threadsafe(close_all(), self._controller.loop).result(timeout=5)

    def reset(self) -> None:
        self.drop_connections()
        self.faults = Faults()
        with self._lock:
            self._messages.clear()

    # --- called from the server's thread ------------------------------------------------------
    def _track(self, smtp: SMTP) -> None:
        with self._lock:
            self._sessions.add(smtp)

    def _store(self, envelope: Envelope, session: Session) -> int:
        raw = bytes(envelope.original_content or b"")
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            raw=raw,
            peer=tuple(session.peer),
            parsed=message_from_bytes(raw, policy=policy.default),
        )
        with self._lock:
            self._messages.append(message)
            return len(self._messages)

    def _authenticate(self, smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
        expected = self.faults.credentials
        if expected is None:
            return AuthResult(success=True)
        ok = isinstance(data, LoginPassword) and (data.login.decode(), data.password.decode()) == expected
        # handled=False: aiosmtpd answers a failure with 535 5.7.8 itself.
        return AuthResult(success=ok, handled=False)


def _close(smtp: SMTP) -> None:
    if smtp.transport is not None:
        smtp.transport.close()
