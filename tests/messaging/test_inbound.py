"""Inbound messages: the carriers' keywords feed the suppression list, for the client that last sent
to the number; signed like receipts; a provider's retry does nothing twice; bad input is a 4xx."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import urlencode

import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client import REGISTRY
from twilio.request_validator import RequestValidator

from messaging.models import ApiClient, InboundMessage, Message, Suppression
from messaging.suppressions.inbound import inbound_attributed_client, inbound_keyword
from messaging.suppressions.services import suppression_add
from providers.conf import provider_config, providers_setting
from tests.support.signed_inbound import TWILIO_INBOUND_PATH, VONAGE_INBOUND_PATH, twilio_inbound, vonage_inbound

NUMBER = "+14155552671"


# --- keywords ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "keyword"),
    [
        ("STOP", "STOP"),
        ("stop", "STOP"),
        ("  Stop \n", "STOP"),
        ("stop.", "STOP"),
        ("STOP!!", "STOP"),
        ("stop !", "STOP"),
        ("Unsubscribe", "UNSUBSCRIBE"),
        ("stopall", "STOPALL"),
        ("optout", "OPTOUT"),
        ("cancel", "CANCEL"),
        ("end", "END"),
        ("quit", "QUIT"),
        ("revoke", "REVOKE"),
        ("start", "START"),
        ("Unstop", "UNSTOP"),
        ("yes", "YES"),
        ("help?", "HELP"),
        ("Info", "INFO"),
        ("stop please", ""),
        ("please stop", ""),
        ("STOP ALL", ""),
        ("opt out", ""),
        ("¡stop", ""),  # punctuation before the word is not ignored
        ("stops", ""),
        ("", ""),
        ("   ", ""),
        ("!!!", ""),
        ("Hello, when is my appointment?", ""),
    ],
)
def test_a_keyword_is_the_whole_message_in_any_case_trimmed_of_trailing_punctuation(body, keyword):
    assert inbound_keyword(body) == keyword


# --- attribution ---------------------------------------------------------------------------------
@pytest.fixture
def globex(db):
    return ApiClient.objects.create(name="globex")


@pytest.fixture
def sent(make_message):
    """A message dispatched to `to` on `channel` by `client` (default acme), `ago` before now."""

    def send(client=None, *, to=NUMBER, channel="sms", ago=timedelta(minutes=1)):
        at = timezone.now() - ago
        fields = {"client": client} if client is not None else {}
        return make_message(**fields, to=to, channel=channel, state="dispatched", dispatched_at=at, created_at=at)

    return send


@pytest.mark.django_db
def test_the_latest_message_dispatched_to_the_number_on_the_channel_names_the_client(sent, globex, client_key):
    acme = client_key[0]
    sent(ago=timedelta(hours=2))
    sent(globex, ago=timedelta(hours=1))
    sent(to="+14155550000", ago=timedelta(seconds=1))  # another number
    sent(channel="whatsapp", ago=timedelta(seconds=1))  # another channel
    assert inbound_attributed_client(channel="sms", address=NUMBER) == globex
    assert inbound_attributed_client(channel="whatsapp", address=NUMBER) == acme
    assert inbound_attributed_client(channel="sms", address="+14155559999") is None


@pytest.mark.django_db
def test_a_message_never_dispatched_names_no_client(make_message):
    make_message(to=NUMBER)  # accepted, waiting
    assert inbound_attributed_client(channel="sms", address=NUMBER) is None


@pytest.mark.django_db
def test_attribution_reads_the_recipient_index(sent):
    sent()
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # a tiny table: ask what a large one would use
        query = Message.objects.filter(channel="sms", to=NUMBER, dispatched_at__isnull=False).order_by(
            "-dispatched_at"
        )[:1]
        sql, params = query.values("client_id").query.sql_with_params()
        cursor.execute(f"EXPLAIN {sql}", params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "message_recipient_dispatched" in plan, plan
    assert "Sort" not in plan, plan  # read in dispatch order from the index


# --- the webhooks --------------------------------------------------------------------------------
def post_twilio(client, body, **kwargs):
    params, headers = twilio_inbound(body, **kwargs)
    return client.post(TWILIO_INBOUND_PATH, data=params, **headers)


def active(client=None, channel="sms", address=NUMBER):
    rows = Suppression.objects.filter(channel=channel, address=address, lifted_at__isnull=True)
    return rows.filter(client=client) if client is not None else rows


@pytest.mark.django_db
def test_twilio_stop_suppresses_the_number_for_the_client_that_sent_last_only(client, sent, globex, client_key):
    acme = client_key[0]
    sent(acme, ago=timedelta(days=2))
    sent(globex, ago=timedelta(hours=1))  # the most recent sender: the STOP answers globex
    response = post_twilio(client, "Stop")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/xml")
    assert "<Message>" not in response.content.decode()  # nothing sent back (Twilio confirms STOP itself)
    suppression = active(globex).get()
    assert (suppression.reason, suppression.scope, suppression.source) == ("stop_keyword", "", "twilio inbound")
    assert not active(acme).exists()
    record = InboundMessage.objects.get()
    assert (record.client, record.keyword, record.action, record.channel) == (globex, "STOP", "suppressed", "sms")
    assert record.sender == NUMBER and record.to == "+15005550006"


@pytest.mark.django_db
def test_the_same_inbound_stop_delivered_twice_does_nothing_twice(client, sent, client_key):
    sent()
    params, headers = twilio_inbound("STOP", sid="SM" + "1" * 32)
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 200
    suppression = active().get()
    suppression.lifted_at = timezone.now()  # lifted meanwhile (e.g. by an operator)
    suppression.save()
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 200  # the provider's retry
    assert not active().exists() and Suppression.objects.count() == 1
    assert InboundMessage.objects.count() == 1


@pytest.mark.django_db
def test_start_lifts_the_stop_and_the_providers_opt_out_but_not_a_manual_entry(client, sent, client_key):
    acme = client_key[0]
    sent()
    assert post_twilio(client, "STOP").status_code == 200
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="manual", scope="marketing")
    assert active(acme).count() == 2
    assert post_twilio(client, "start").status_code == 200
    [left] = active(acme)
    assert left.reason == "manual"
    stop = Suppression.objects.get(reason="stop_keyword")
    assert stop.lifted_by == "twilio inbound" and "START" in stop.lifted_reason
    assert InboundMessage.objects.get(keyword="START").action == "lifted"
    assert post_twilio(client, "YES").status_code == 200
    assert InboundMessage.objects.get(keyword="YES").action == "nothing_to_lift"


@pytest.mark.django_db
def test_twilio_help_is_answered_with_twiml(client, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SMS_HELP_REPLY": "Acme alerts: reply STOP to end. <Help & info>"}
    response = post_twilio(client, "help")  # answered even when no client ever sent to the number
    assert response.status_code == 200 and response["Content-Type"].startswith("text/xml")
    assert response.content.decode() == (
        '<?xml version="1.0" encoding="UTF-8"?>'
        "<Response><Message>Acme alerts: reply STOP to end. &lt;Help &amp; info&gt;</Message></Response>"
    )
    assert InboundMessage.objects.get().action == "help_replied"
    assert not Message.objects.exists()  # the reply is in the answer, not a message of its own


@pytest.mark.django_db
@pytest.mark.parametrize("setting", ["", "none", " None "])
def test_help_is_not_answered_when_the_reply_is_turned_off(client, sent, settings, setting):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SMS_HELP_REPLY": setting}
    sent()
    response = post_twilio(client, "HELP")
    assert response.status_code == 200 and "<Message>" not in response.content.decode()
    assert client.post(VONAGE_INBOUND_PATH, data=vonage_inbound("HELP")).status_code == 204
    assert Message.objects.count() == 1  # only the one sent before: no reply
    assert set(InboundMessage.objects.values_list("action", flat=True)) == {"none"}


@pytest.mark.django_db
def test_twilio_set_to_get_is_verified_over_the_query(client, sent, client_key):
    sent()
    params, _ = twilio_inbound("STOP")
    path = f"{TWILIO_INBOUND_PATH}?{urlencode(params)}"
    url = providers_setting("PUBLIC_URL").rstrip("/") + path
    signature = RequestValidator(provider_config("twilio")["AUTH_TOKEN"]).compute_signature(url, {})
    assert client.get(path, HTTP_X_TWILIO_SIGNATURE=signature).status_code == 200
    assert active(client_key[0]).exists()
    assert client.get(path.replace("STOP", "START"), HTTP_X_TWILIO_SIGNATURE=signature).status_code == 403


@pytest.mark.django_db
def test_each_inbound_is_counted_once_by_what_it_did(client, sent):
    sent()

    def count(action):
        return (
            REGISTRY.get_sample_value(
                "conductor_inbound_messages_total", {"provider": "twilio", "channel": "sms", "action": action}
            )
            or 0
        )

    before = count("suppressed"), count("none")
    params, headers = twilio_inbound("STOP")
    for _ in range(3):
        client.post(TWILIO_INBOUND_PATH, data=params, **headers)
    post_twilio(client, "hello")
    assert (count("suppressed"), count("none")) == (before[0] + 1, before[1] + 1)


@pytest.mark.django_db
def test_twilio_whatsapp_stop_suppresses_the_whatsapp_address(client, sent, client_key):
    sent(channel="whatsapp")
    response = post_twilio(client, "STOP", whatsapp=True, to="+14155238886")
    assert response.status_code == 200
    assert active(client_key[0], channel="whatsapp").exists() and not active(channel="sms").exists()
    assert InboundMessage.objects.get().channel == "whatsapp"


@pytest.mark.django_db
def test_a_sender_number_written_otherwise_is_read_as_e164(client, sent, client_key):
    sent()
    assert post_twilio(client, "STOP", sender="+1 (415) 555-2671").status_code == 200
    assert active(client_key[0]).exists() and InboundMessage.objects.get().sender == NUMBER


@pytest.mark.django_db
def test_a_stop_to_a_number_no_client_sent_to_suppresses_nothing_and_is_answered_200(client, sent):
    sent(to="+14155550000")
    assert post_twilio(client, "STOP").status_code == 200
    assert not Suppression.objects.exists()
    record = InboundMessage.objects.get()
    assert record.action == "unattributed" and record.client is None


@pytest.mark.django_db
def test_an_ordinary_message_is_recorded_and_changes_nothing(client, sent, client_key):
    sent()
    response = post_twilio(client, "stop please, I moved")
    assert response.status_code == 200 and "<Message>" not in response.content.decode()
    assert not Suppression.objects.exists()
    record = InboundMessage.objects.get()
    assert (record.action, record.keyword, record.client) == ("none", "", client_key[0])


@pytest.mark.django_db
def test_vonage_stop_suppresses_and_start_lifts(client, sent, client_key):
    sent()
    response = client.post(VONAGE_INBOUND_PATH, data=vonage_inbound("STOP"))
    assert response.status_code == 204
    suppression = active(client_key[0]).get()
    assert (suppression.reason, suppression.source) == ("stop_keyword", "vonage inbound")
    record = InboundMessage.objects.get()
    assert record.sender == NUMBER and record.to == "+12015550123" and record.provider == "vonage"
    # Vonage may be set to send inbound messages as JSON, or as GET.
    start = json.dumps(vonage_inbound("Start"))
    response = client.post(VONAGE_INBOUND_PATH, data=start, content_type="application/json")
    assert response.status_code == 204 and not active().exists()
    assert client.get(VONAGE_INBOUND_PATH, vonage_inbound("end")).status_code == 204
    assert active(client_key[0]).exists()


@pytest.mark.django_db
def test_vonage_help_is_answered_by_a_critical_message_through_conductor_once(client, sent, client_key, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "SMS_HELP_REPLY": "Acme alerts. Reply STOP to end."}
    sent()
    params = vonage_inbound("HELP")
    assert client.post(VONAGE_INBOUND_PATH, data=params).status_code == 204
    assert client.post(VONAGE_INBOUND_PATH, data=params).status_code == 204  # Vonage's retry
    reply = Message.objects.get(dispatched_at__isnull=True)
    assert (reply.client, reply.channel, reply.to, reply.body) == (
        client_key[0],
        "sms",
        NUMBER,
        "Acme alerts. Reply STOP to end.",
    )
    assert (reply.priority, reply.category, reply.state) == ("critical", "help_reply", "accepted")
    assert InboundMessage.objects.get().action == "help_replied"


@pytest.mark.django_db
def test_vonage_help_from_a_number_no_client_sent_to_sends_nothing(client, db):
    assert client.post(VONAGE_INBOUND_PATH, data=vonage_inbound("HELP")).status_code == 204
    assert not Message.objects.exists() and InboundMessage.objects.get().action == "unattributed"


# --- refused: nothing changes ----------------------------------------------------------------------
@pytest.mark.django_db
def test_a_forged_twilio_inbound_is_403_and_changes_nothing(client, sent):
    sent()
    assert post_twilio(client, "STOP", auth_token="not-the-token").status_code == 403
    params, headers = twilio_inbound("STOP")
    params["From"] = "+14155550000"  # altered after signing
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 403
    params, _ = twilio_inbound("STOP")
    assert client.post(TWILIO_INBOUND_PATH, data=params).status_code == 403  # unsigned
    # Signed for the receipts' URL, replayed at the inbound one.
    params, headers = twilio_inbound("STOP", url="http://127.0.0.1:8000/webhooks/twilio/")
    assert client.post(TWILIO_INBOUND_PATH, data=params, **headers).status_code == 403
    assert not Suppression.objects.exists() and not InboundMessage.objects.exists()


@pytest.mark.django_db
def test_a_forged_vonage_inbound_is_403_and_changes_nothing(client, sent):
    sent()
    assert client.post(VONAGE_INBOUND_PATH, data=vonage_inbound("STOP", secret="wrong")).status_code == 403
    params = vonage_inbound("HELLO")
    params["text"] = "STOP"  # altered after signing
    assert client.post(VONAGE_INBOUND_PATH, data=params).status_code == 403
    unsigned = {key: value for key, value in vonage_inbound("STOP").items() if key != "sig"}
    assert client.post(VONAGE_INBOUND_PATH, data=unsigned).status_code == 403
    assert not Suppression.objects.exists() and not InboundMessage.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("missing", ["MessageSid", "From", "To"])
def test_a_twilio_inbound_without_a_required_field_is_400_naming_it(client, missing):
    params, headers = twilio_inbound("STOP", **{missing: ""})
    response = client.post(TWILIO_INBOUND_PATH, data=params, **headers)
    assert response.status_code == 400 and missing in response.json()["detail"]
    assert not InboundMessage.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"msisdn": ""}, "msisdn"),
        ({"messageId": None}, "messageId"),
        ({"msisdn": 14155552671}, "msisdn"),
        ({"text": ["STOP"]}, "text"),
        ({"messageId": "x" * 200}, "provider_message_id"),
        ({"msisdn": "1" * 80}, "from"),
        ({"msisdn": "1415555\x002671"}, "from"),
    ],
)
def test_a_malformed_vonage_inbound_is_400_naming_the_field(client, overrides, field):
    body = json.dumps(vonage_inbound("STOP", **overrides))
    response = client.post(VONAGE_INBOUND_PATH, data=body, content_type="application/json")
    assert response.status_code == 400, response.content
    assert field in response.json()["detail"]
    assert not InboundMessage.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "content_type", "body"),
    [
        (VONAGE_INBOUND_PATH, "application/json", b"{not json"),
        (VONAGE_INBOUND_PATH, "application/json", b"[1, 2]"),
        (VONAGE_INBOUND_PATH, "application/json", b'{"msisdn": "1\\ud800"}'),
        (TWILIO_INBOUND_PATH, "multipart/form-data; boundary=x", b"--x\r\nbroken"),
        (TWILIO_INBOUND_PATH, "multipart/form-data", b"no boundary"),
        (TWILIO_INBOUND_PATH, "application/x-www-form-urlencoded", b"From=%ff%fe&Body=\xff"),
        (VONAGE_INBOUND_PATH, "multipart/form-data; boundary=x", b"--x\r\nbroken"),
    ],
)
def test_an_unreadable_inbound_is_a_4xx_never_a_500(client, path, content_type, body):
    response = client.generic("POST", path, data=body, content_type=content_type)
    assert 400 <= response.status_code < 500, (response.status_code, response.content[:200])
    assert not InboundMessage.objects.exists()


@pytest.mark.django_db
def test_a_body_with_characters_we_could_not_store_is_still_read(client, sent):
    sent()  # the body is never stored: a NUL in it is no reason for the provider to retry for a day
    body = json.dumps(vonage_inbound("STOP\x00"))
    assert client.post(VONAGE_INBOUND_PATH, data=body, content_type="application/json").status_code == 204
    assert InboundMessage.objects.get().action == "none" and not Suppression.objects.exists()


@pytest.mark.django_db
def test_a_provider_without_an_inbound_webhook_is_404(client):
    response = client.post("/webhooks/mailgun/inbound/", data={"From": NUMBER})
    assert response.status_code == 404 and "inbound" in response.json()["detail"]


@pytest.mark.django_db
def test_a_provider_no_route_sends_through_is_404(client, settings):
    settings.CONDUCTOR = {**settings.CONDUCTOR, "ROUTES": {"sms": ["twilio"], "email": ["mailgun"]}}
    assert client.post(VONAGE_INBOUND_PATH, data=vonage_inbound("STOP")).status_code == 404
    assert not InboundMessage.objects.exists()


@pytest.mark.django_db
def test_the_receipts_route_still_takes_receipts_and_not_inbound_messages(client, sent):
    sent()
    params, headers = twilio_inbound("STOP")
    # An inbound message posted to the receipts' URL: not signed for it, and no status in it.
    assert client.post("/webhooks/twilio/", data=params, **headers).status_code in (400, 403)
    assert not Suppression.objects.exists()
