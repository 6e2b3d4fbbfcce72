"""The send path and the suppression list: no suppressed message reaches any provider, on any hop
or retry, and a provider's opt-out refusal feeds the list (sandbox over HTTP)."""

from __future__ import annotations

from collections import Counter

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from messaging.dispatch import messages_dispatch
from messaging.metrics import MESSAGES_SUPPRESSED
from messaging.models import ApiClient, Message, Suppression
from messaging.suppressions.services import suppression_add

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"
EMAIL = {"fallback_channels": ["email"], "fallback_to": {"email": "ada@example.com"}}


@pytest.fixture(autouse=True)
def routes(settings):
    settings.CONDUCTOR = {
        **settings.CONDUCTOR,
        "ROUTES": {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun"]},
    }


@pytest.fixture
def acme(client_key):
    return client_key[0]


def hops(message):
    return list(message.attempts.order_by("number").values_list("provider", "outcome", "note"))


def dispatch(message):
    messages_dispatch(message_ids=[str(message.pk)])
    message.refresh_from_db()
    return message


def suppressed_count(channel="sms"):
    return MESSAGES_SUPPRESSED.labels(channel=channel, stage="dispatch")._value.get()


def test_a_suppressed_number_falls_back_to_the_email_channel_never_to_vonage(sandbox, make_message, acme):
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    before = suppressed_count()
    message = dispatch(make_message(**EMAIL))
    assert message.state == "dispatched" and message.provider == "mailgun"
    assert hops(message) == [
        ("twilio", "skipped", "skipped: suppressed (stop_keyword)"),
        ("vonage", "skipped", "skipped: suppressed (stop_keyword)"),
        ("mailgun", "accepted", "fallback after vonage (suppressed)"),
    ]
    assert message.attempt_count == 3
    assert sandbox.requests(provider="twilio") == [] and sandbox.requests(provider="vonage") == []
    assert [r["to"] for r in sandbox.requests(provider="mailgun")] == ["ada@example.com"]
    assert suppressed_count() == before + 1


def test_every_hop_suppressed_fails_as_suppressed_and_nothing_is_sent(sandbox, make_message, acme):
    sms, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    suppression_add(client=acme, channel="email", address="ADA@example.com", reason="complaint")
    before = suppressed_count()
    message = dispatch(make_message(**EMAIL))
    assert message.state == "failed" and message.last_error_type == "suppressed"
    assert message.last_error_message == f"the sms address is suppressed (stop_keyword, suppression {sms.pk})"
    assert [outcome for _, outcome, _ in hops(message)] == ["skipped"] * 3
    assert message.lease_expires_at is None and message.next_attempt_at is None
    assert sandbox.requests() == []
    assert suppressed_count() == before + 1
    assert messages_dispatch(message_ids=[str(message.pk)]) == 0  # failed: never claimed again


def test_a_stop_while_the_message_waits_for_its_retry_stops_it_at_the_retry(sandbox, make_message, acme):
    sandbox.faults("twilio", error_rate=1.0)
    sandbox.faults("vonage", error_rate=1.0)
    message = dispatch(make_message())
    assert message.state == "accepted" and message.failed_rounds == 1 and message.next_attempt_at
    sent_before = len(sandbox.requests())
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    sandbox.faults("twilio", error_rate=0.0)  # healthy again: it would go out now
    sandbox.faults("vonage", error_rate=0.0)
    Message.objects.filter(pk=message.pk).update(next_attempt_at=timezone.now())  # its retry is due
    message = dispatch(message)
    assert message.state == "failed" and message.last_error_type == "suppressed"
    assert len(sandbox.requests()) == sent_before
    assert [outcome for _, outcome, _ in hops(message)] == ["transient_error"] * 2 + ["skipped"] * 2


def test_an_exempt_category_still_goes_out(sandbox, make_message, acme):
    acme.opt_out_exempt_categories = ["otp"]
    acme.save()
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    otp = dispatch(make_message(category="otp"))
    marketing = dispatch(make_message(category="marketing"))
    assert otp.state == "dispatched" and otp.provider == "twilio"
    assert marketing.state == "failed" and marketing.last_error_type == "suppressed"
    assert [r["message_id"] for r in sandbox.requests()] == [str(otp.pk)]


def test_another_clients_message_to_the_same_number_is_sent(sandbox, make_message, acme):
    other = ApiClient.objects.create(name="other")
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    theirs, ours = make_message(client=other), make_message()
    messages_dispatch(message_ids=[str(theirs.pk), str(ours.pk)])
    theirs.refresh_from_db()
    ours.refresh_from_db()
    assert theirs.state == "dispatched" and ours.state == "failed"
    assert [r["message_id"] for r in sandbox.requests()] == [str(theirs.pk)]


def test_a_lifted_suppression_lets_the_message_go(sandbox, make_message, acme):
    from messaging.suppressions.services import suppression_lift

    suppression, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    suppression_lift(suppression=suppression, reason="START")
    assert dispatch(make_message()).state == "dispatched"


def test_twilio_21610_is_opted_out_suppresses_the_number_and_never_tries_vonage(sandbox, make_message, acme):
    sandbox.faults("twilio", opted_out=[NUMBER])
    message = dispatch(make_message())
    assert message.state == "failed" and message.last_error_type == "opted_out"
    assert message.last_error_code == "21610"
    assert [(p, o) for p, o, _ in hops(message)] == [("twilio", "permanent_error")]
    assert sandbox.requests(provider="vonage") == []
    suppression = Suppression.objects.get(client=acme, channel="sms", address=NUMBER)
    assert (suppression.reason, suppression.scope, suppression.source, suppression.covers_exempt) == (
        "provider_reported",
        "",
        "twilio 21610",
        False,
    )
    # The next message to the number is stopped before any provider.
    later = dispatch(make_message())
    assert later.state == "failed" and later.last_error_type == "suppressed"
    assert len(sandbox.requests()) == 1


def test_an_exempt_code_refused_by_twilios_own_opt_out_list_still_goes_through_vonage(sandbox, make_message, acme):
    """Twilio keeps its own list after a STOP and refuses even a code the recipient asked for;
    our opt-out leaves the client's exempt categories alone, so the next provider takes it."""
    acme.opt_out_exempt_categories = ["otp"]
    acme.save()
    sandbox.faults("twilio", opted_out=[NUMBER])
    code = dispatch(make_message(category="otp"))
    assert code.state == "dispatched" and code.provider == "vonage"
    assert [(p, o) for p, o, _ in hops(code)] == [("twilio", "permanent_error"), ("vonage", "accepted")]
    assert Suppression.objects.get(client=acme, channel="sms", address=NUMBER).reason == "provider_reported"
    promo = dispatch(make_message(category="promo"))  # not exempt: stopped before any provider
    assert promo.state == "failed" and promo.last_error_type == "suppressed"
    assert len(sandbox.requests(message_id=str(promo.pk))) == 0


def test_after_an_opt_out_the_fallback_channel_still_goes(sandbox, make_message, acme):
    sandbox.faults("twilio", opted_out=[NUMBER])
    message = dispatch(make_message(**EMAIL))
    assert message.state == "dispatched" and message.provider == "mailgun"
    assert hops(message) == [
        ("twilio", "permanent_error", "first choice"),
        ("vonage", "skipped", "skipped: suppressed (provider_reported)"),
        ("mailgun", "accepted", "fallback after vonage (suppressed)"),
    ]
    assert sandbox.requests(provider="vonage") == []


def test_a_vonage_barred_number_is_opted_out_too(sandbox, make_message, acme):
    sandbox.faults("twilio", error_rate=1.0)
    sandbox.faults("vonage", opted_out=[NUMBER])
    message = dispatch(make_message())
    assert message.state == "failed" and (message.last_error_type, message.last_error_code) == ("opted_out", "7")
    assert Suppression.objects.get(client=acme, address=NUMBER).source == "vonage 7"


def test_an_invalid_number_is_suppressed_for_every_category(sandbox, make_message, acme):
    message = dispatch(make_message(to="+1234"))
    assert message.state == "failed" and message.last_error_type == "invalid_recipient"
    assert sandbox.requests(provider="vonage") == []
    suppression = Suppression.objects.get(client=acme, channel="sms")
    assert (suppression.address, suppression.covers_exempt, suppression.source) == ("+1234", True, "twilio 21211")


def test_a_claim_of_many_messages_reads_the_suppressions_once(sandbox, make_message, acme, settings):
    other = ApiClient.objects.create(name="other")
    numbers = [f"+1415555{1000 + i:04d}" for i in range(40)]
    for number in numbers[:5]:
        suppression_add(client=acme, channel="sms", address=number, reason="stop_keyword")
    messages = [make_message(to=number, priority="bulk", body="sale", **EMAIL) for number in numbers[:20]]
    messages += [make_message(client=other, to=number, priority="bulk", body="sale") for number in numbers[:20]]
    with CaptureQueriesContext(connection) as queries:
        assert messages_dispatch(message_ids=[str(m.pk) for m in messages]) == 40
    reads = [q["sql"] for q in queries if 'FROM "messaging_suppression"' in q["sql"]]
    assert len(reads) == 1, reads
    rows = Message.objects.filter(pk__in=[m.pk for m in messages])
    assert Counter(rows.values_list("provider", flat=True)) == {"twilio": 35, "mailgun": 5}
    assert Counter(rows.values_list("state", flat=True)) == {"dispatched": 40}
    suppressed = set(numbers[:5])
    assert not [
        r
        for r in sandbox.requests(provider="twilio")
        if r["to"] in suppressed and r["message_id"] in {str(m.pk) for m in messages if m.client_id == acme.pk}
    ]


def test_a_fair_bulk_claim_skips_the_suppressed_and_sends_the_rest(sandbox, make_message, acme):
    suppression_add(client=acme, channel="sms", address="+14155551001", reason="manual")
    messages = [make_message(to=f"+1415555{1000 + i:04d}", priority="bulk") for i in range(5)]
    assert messages_dispatch(fair_channel="sms") == 5
    states = dict(Message.objects.filter(pk__in=[m.pk for m in messages]).values_list("to", "last_error_type"))
    assert states["+14155551001"] == "suppressed"
    assert sorted(r["to"] for r in sandbox.requests()) == sorted(set(states) - {"+14155551001"})


def test_a_suppressed_message_does_not_wait_for_a_rate_limited_providers_slot(sandbox, make_message, acme, settings):
    from providers.guards import reset_guards

    providers = {name: dict(conf) for name, conf in settings.CONDUCTOR_PROVIDERS.items()}
    providers["twilio"].update(RATE_LIMIT_PER_SECOND=0.1, RATE_LIMIT_BURST=1, RATE_LIMIT_MAX_INLINE_WAIT_SECONDS=0.5)
    settings.CONDUCTOR_PROVIDERS = providers
    reset_guards()
    assert dispatch(make_message(to="+14155550000")).state == "dispatched"  # takes the only slot
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    message = dispatch(make_message())  # claimed alone (rate-limited first hop): skipped before any slot
    assert message.state == "failed" and message.last_error_type == "suppressed"
    assert len(sandbox.requests()) == 1
