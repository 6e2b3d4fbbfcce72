"""The suppressions admin: staff list (addresses masked), search by any form of an address, add,
lift with who did it; the API client's opt-out-exempt categories; everyone else refused."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from messaging.models import ApiClient, Suppression
from messaging.suppressions.services import suppression_add

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"
CHANGELIST = "admin:messaging_suppression_changelist"


@pytest.fixture
def acme():
    return ApiClient.objects.create(name="acme")


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests"))
    return client


def test_staff_see_the_list_masked_and_find_an_address_in_any_form(staff, acme):
    mine, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    suppression_add(client=acme, channel="email", address="ada@example.com", reason="complaint")
    page = staff.get(reverse(CHANGELIST)).content.decode()
    assert "+1415*****71" in page and NUMBER not in page and "ada@example.com" not in page
    found = staff.get(reverse(CHANGELIST), {"q": "+1 (415) 555-2671"})
    assert list(found.context["cl"].result_list) == [mine]
    assert len(staff.get(reverse(CHANGELIST), {"q": "ADA@Example.com"}).context["cl"].result_list) == 1
    assert len(staff.get(reverse(CHANGELIST), {"q": "acme"}).context["cl"].result_list) == 2
    detail = staff.get(reverse("admin:messaging_suppression_change", args=[mine.pk])).content.decode()
    assert NUMBER in detail  # whole on the row's page, for staff
    filtered = staff.get(reverse(CHANGELIST), {"reason": "complaint", "channel": "email"})
    assert len(filtered.context["cl"].result_list) == 1


def test_the_lift_action_records_who_lifted(staff, acme):
    row, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    response = staff.post(reverse(CHANGELIST), {"action": "lift_selected", "_selected_action": [row.pk]}, follow=True)
    assert "Lifted 1" in response.content.decode()
    row.refresh_from_db()
    assert not row.active and row.lifted_reason == "lifted in admin by ops" and row.lifted_by == "admin ops"
    other, _ = suppression_add(client=acme, channel="sms", address="+14155552672", reason="manual")
    assert list(staff.get(reverse(CHANGELIST), {"active": "no"}).context["cl"].result_list) == [row]
    assert list(staff.get(reverse(CHANGELIST), {"active": "yes"}).context["cl"].result_list) == [other]


def test_staff_add_a_suppression_through_the_service(staff, acme):
    response = staff.post(
        reverse("admin:messaging_suppression_add"),
        {
            "client": acme.pk,
            "channel": "sms",
            "address": "+1 415 555 2671",
            "scope": "",
            "reason": "manual",
            "note": "",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    row = Suppression.objects.get()
    assert row.address == NUMBER and row.source == "admin ops" and row.active
    bad = staff.post(
        reverse("admin:messaging_suppression_add"),
        {"client": acme.pk, "channel": "sms", "address": "4155552671", "reason": "manual"},
    )
    assert bad.status_code == 200 and "E.164" in bad.content.decode() and Suppression.objects.count() == 1


def test_the_client_page_shows_the_opt_out_exempt_categories(staff, acme):
    page = staff.get(reverse("admin:messaging_apiclient_change", args=[acme.pk])).content.decode()
    assert "opt_out_exempt_categories" in page


def test_staff_without_the_permission_cannot_lift_and_outsiders_see_nothing(client, acme):
    row, _ = suppression_add(client=acme, channel="sms", address=NUMBER, reason="stop_keyword")
    looker = User.objects.create_user("looker", password="pw-for-tests", is_staff=True)
    looker.user_permissions.add(Permission.objects.get(codename="view_suppression"))
    client.force_login(looker)
    assert client.get(reverse(CHANGELIST)).status_code == 200
    client.post(reverse(CHANGELIST), {"action": "lift_selected", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.active
    client.force_login(User.objects.create_user("outsider", password="pw-for-tests", is_staff=False))
    assert client.get(reverse(CHANGELIST)).status_code == 302  # to the login page
    client.post(reverse(CHANGELIST), {"action": "lift_selected", "_selected_action": [row.pk]})
    row.refresh_from_db()
    assert row.active


def test_staff_see_inbound_messages_with_the_sender_masked_and_cannot_edit_them(staff, acme, client):
    from django.utils import timezone

    from messaging.models import InboundMessage

    inbound = InboundMessage.objects.create(
        provider="twilio",
        provider_message_id="SM" + "1" * 32,
        channel="sms",
        client=acme,
        sender=NUMBER,
        to="+15005550006",
        keyword="STOP",
        action="suppressed",
        received_at=timezone.now(),
    )
    page = staff.get(reverse("admin:messaging_inboundmessage_changelist")).content.decode()
    assert "+1415*****71" in page and NUMBER not in page and "STOP" in page
    assert staff.get(reverse("admin:messaging_inboundmessage_change", args=[inbound.pk])).status_code == 200
    assert staff.post(reverse("admin:messaging_inboundmessage_delete", args=[inbound.pk])).status_code == 403
    assert InboundMessage.objects.filter(pk=inbound.pk).exists()
