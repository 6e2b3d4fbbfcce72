"""`make demo` against the real stack (web, workers, beat, sandbox): the campaign settles and the
edges show (deadlines carried to the provider, a WhatsApp template and a refused free-form
message, scheduled reminders, a message held by quiet hours)."""

from __future__ import annotations

import io
import re

import pytest
from django.core.management import call_command

from messaging.management.commands.demo_setup import DEMO_CLIENT, DEMO_QUIET_HOURS
from messaging.models import ApiClient, Message
from messaging.services import api_key_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_the_demo_campaign_settles_and_shows_the_edges(live, settings, capsys):
    key = api_key_create(client_name=DEMO_CLIENT)[1]
    ApiClient.objects.filter(name=DEMO_CLIENT).update(quiet_hours=DEMO_QUIET_HOURS)  # as demo_setup
    settings.SANDBOX_URL = live.sandbox_url
    out = io.StringIO()
    call_command("send_demo_campaign", api_url=live.web_url, key=key, count=5, timeout=120, stdout=out)
    text = out.getvalue()
    print(text)
    assert re.search(r"All \d+ messages settled", text), text
    # Every OTP told Twilio (ValidityPeriod, seconds) or Vonage (ttl, ms) how long it may still try.
    told = re.findall(r"(?:twilio ValidityPeriod=(\d+)|vonage ttl=(\d+))", text)
    assert len(told) >= 5, text
    for seconds, milliseconds in told:  # at most the 300 s left, rounded down
        assert 250 <= int(seconds or 0) <= 299 or 250_000 <= int(milliseconds or 0) <= 300_000, told
    assert re.search(r"whatsapp   template: (delivered|read)", text), text
    assert "whatsapp   free-form: failed (outside_session_window)" in text, text
    assert re.search(r"quiet      a notice to a recipient in \S+ \(night there now\) waits until \d\d:\d\d", text)
    held = Message.objects.get(category="demo-quiet")
    assert held.state == "cancelled" and held.dispatched_at is None  # held, then cancelled before its time
    assert live.sandbox_requests(message_id=str(held.pk)) == []
    scheduled = Message.objects.filter(send_at__isnull=False)
    assert scheduled.count() == 3 and all(m.dispatched_at >= m.send_at for m in scheduled)
