"""A send given up on cannot reach the provider later: each adapter resets the connection of a
call it timed out on, so no request bytes are left with the kernel to be retransmitted once the
network comes back (providers.http.ABORT_ON_CLOSE; the double send it caused:
tests/integration/test_multi_host.py, docs/multi-host.md)."""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Iterator

import pytest

from messaging.send_loop import send_loop
from providers.conf import provider_config
from providers.mailgun import MailgunProvider
from providers.twilio import TwilioProvider
from providers.types import AmbiguousProviderError
from providers.vonage import VonageProvider
from tests.providers.contract import send_request

PROVIDERS = {
    "twilio": (TwilioProvider, "+14155552671"),
    "vonage": (VonageProvider, "+14155552671"),
    "mailgun": (MailgunProvider, "someone@example.com"),
}


class SilentServer:
    """Reads every request and never answers; says how each connection then ended: `reset` (the
    client dropped it, unsent bytes and all) or `closed` (an orderly close, after which the
    kernel would still have delivered anything left unsent)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.endings: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                while conn.recv(65536):
                    pass
                self.endings.put("closed")
            except ConnectionResetError:
                self.endings.put("reset")
            except TimeoutError:
                self.endings.put("still open")


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.listener.close()


@pytest.mark.parametrize("name", PROVIDERS)
@pytest.mark.parametrize("way", ["send", "send_async"])
def test_a_send_that_timed_out_resets_its_connection(silent_server, name, way):
    provider_class, recipient = PROVIDERS[name]
    provider = provider_class({**provider_config(name), "BASE_URL": silent_server.url, "TIMEOUT_SECONDS": 0.3})
    request = send_request(recipient)
    with pytest.raises(AmbiguousProviderError):
        if way == "send":
            provider.send(request)
        else:
            send_loop().run(provider.send_async(request))
    assert silent_server.endings.get(timeout=10) == "reset"
