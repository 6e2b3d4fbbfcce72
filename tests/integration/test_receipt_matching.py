"""A genuinely signed receipt still changes a message only if that message was handed to that
provider, through real HTTP against the running stack; and receipts of a provider no route uses
are not taken at all (404)."""

from __future__ import annotations

import uuid

import pytest
import requests

from messaging.models import AttemptOutcome, DispatchAttempt, Message, Receipt
from tests.support.processes import PYTHON, free_port, http_ok, wait_until
from tests.support.signed_receipts import (
    MAILGUN_TRACKING_PATH,
    VONAGE_PATH,
    as_json,
    mailgun_body,
    mailgun_event,
    twilio_callback,
    vonage_dlr,
    vonage_signed,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def processed(provider_message_id: str) -> Receipt:
    wait_until(
        lambda: Receipt.objects.filter(provider_message_id=provider_message_id, processed_at__isnull=False).exists(),
        30,
        what="the receipt processed",
    )
    return Receipt.objects.get(provider_message_id=provider_message_id)


def sent_through(message: Message, provider: str, reference: str) -> Message:
    DispatchAttempt.objects.create(
        message=message,
        number=1,
        provider=provider,
        provider_message_id=reference,
        outcome=AttemptOutcome.ACCEPTED,
        started_at=message.created_at,
    )
    Message.objects.filter(pk=message.pk).update(state="dispatched", provider=provider, provider_message_id=reference)
    return message


def post_twilio(live, message_id: str, sid: str) -> int:
    path, params, headers = twilio_callback(live.web_url, message_id=message_id, sid=sid)
    return requests.post(live.web_url + path, data=params, headers=headers, timeout=10).status_code


def test_a_signed_receipt_for_a_message_never_sent_leaves_it_accepted(live, make_message):
    message = make_message(next_attempt_at=None)
    Message.objects.filter(pk=message.pk).update(lease_expires_at=None, enqueued_at=None)
    sid = f"SM{uuid.uuid4().hex}"
    assert post_twilio(live, str(message.pk), sid) == 204
    receipt = processed(sid)
    assert receipt.unmatched_reason == "no_attempt" and not receipt.applied and receipt.message_id is None
    assert not Message.objects.get(pk=message.pk).events.filter(to_state="delivered").exists()


def test_a_signed_receipt_from_another_provider_than_the_one_sent_through_changes_nothing(live, make_message):
    message = sent_through(make_message(), "twilio", f"SM{uuid.uuid4().hex}")
    vonage_id = str(uuid.uuid4())
    params = vonage_signed(vonage_dlr(message_id=str(message.pk), provider_message_id=vonage_id))
    assert requests.post(live.web_url + VONAGE_PATH, data=params, timeout=10).status_code == 204
    assert processed(vonage_id).unmatched_reason == "no_attempt"
    assert Message.objects.get(pk=message.pk).state == "dispatched"


def test_a_signed_receipt_under_another_provider_id_changes_nothing_the_right_one_applies(live, make_message):
    real = f"SM{uuid.uuid4().hex}"
    message = sent_through(make_message(), "twilio", real)
    forged = f"SM{uuid.uuid4().hex}"
    assert post_twilio(live, str(message.pk), forged) == 204
    assert processed(forged).unmatched_reason == "id_mismatch"
    assert Message.objects.get(pk=message.pk).state == "dispatched"
    assert post_twilio(live, str(message.pk), real) == 204
    assert processed(real).applied
    assert Message.objects.get(pk=message.pk).state == "delivered"
    unmatched = requests.get(f"{live.web_url}/metrics", timeout=10).text
    assert 'conductor_receipts_unmatched{provider="twilio",reason="id_mismatch"} 1.0' in unmatched


@pytest.fixture
def web_routing_only_twilio_and_smtp(live):
    """A second web process of the stack whose routes use neither Vonage nor Mailgun (stopped by pid)."""
    port = free_port()
    env = {
        "CONDUCTOR_ROUTE_SMS": "twilio",
        "CONDUCTOR_ROUTE_EMAIL": "smtp",
        "CONDUCTOR_PUBLIC_URL": f"http://127.0.0.1:{port}",
    }
    web = live._spawn(
        "web-routes", [PYTHON, "-m", "gunicorn", "conductor_project.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1"], env
    )
    try:
        wait_until(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, what="the second web process")
        yield f"http://127.0.0.1:{port}"
    finally:
        web.stop()
        live.processes.remove(web)


def test_receipts_of_a_provider_no_route_uses_are_404_and_stored_nowhere(
    live, make_message, web_routing_only_twilio_and_smtp
):
    url = web_routing_only_twilio_and_smtp
    message = sent_through(make_message(), "vonage", str(uuid.uuid4()))
    params = vonage_signed(vonage_dlr(message_id=str(message.pk), provider_message_id=message.provider_message_id))
    assert requests.post(url + VONAGE_PATH, data=params, timeout=10).status_code == 404
    body = mailgun_body(mailgun_event(message_id=str(message.pk)))
    headers = {"Content-Type": "application/json"}
    assert (
        requests.post(url + MAILGUN_TRACKING_PATH, data=as_json(body), headers=headers, timeout=10).status_code == 404
    )
    assert not Receipt.objects.exists()
    # The same receipt at the stack's own web process (both providers routed) is taken.
    assert requests.post(live.web_url + VONAGE_PATH, data=params, timeout=10).status_code == 204
