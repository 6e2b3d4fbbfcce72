"""The admin of callback endpoints and callbacks: staff see them (never a whole secret), act on
endpoints through the services, and see a message's callbacks on its page."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from django.utils import timezone

from messaging.models import CallbackEndpoint, DeadLetter
from tests.support.callback_rows import callback_make, endpoint_make

pytestmark = pytest.mark.django_db

ACTION_CHECKBOX = "_selected_action"
FAILED = {"at": "2026-12-01T10:00:00Z", "status": 503, "error": "Service Unavailable", "latency_ms": 40}


@pytest.fixture
def staff(client):
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests"))
    return client


def changelist(model: str) -> str:
    return reverse(f"admin:messaging_{model}_changelist")


def test_endpoints_are_listed_and_shown_without_their_secrets(staff, client_key):
    endpoint = endpoint_make(client_key[0], failing_since=timezone.now())
    secret = endpoint.secrets[0]["secret"]
    page = staff.get(changelist("callbackendpoint"), {"enabled__exact": "1", "client__id__exact": client_key[0].pk})
    assert page.status_code == 200 and endpoint.url in page.content.decode()
    assert secret not in page.content.decode()
    detail = staff.get(reverse("admin:messaging_callbackendpoint_change", args=[endpoint.pk])).content.decode()
    assert secret[:9] + "…" in detail and secret not in detail and "current" in detail


def test_the_endpoint_actions_go_through_the_services(staff, client_key, make_message):
    endpoint = endpoint_make(client_key[0])
    pending = callback_make(make_message(), endpoint)
    old = endpoint.secrets[0]["secret"]
    response = staff.post(
        changelist("callbackendpoint"), {"action": "disable_selected", ACTION_CHECKBOX: [endpoint.pk]}, follow=True
    )
    assert "Disabled 1; 1 pending callbacks parked" in response.content.decode()
    endpoint.refresh_from_db()
    assert not endpoint.enabled and endpoint.disabled_reason == "disabled by ops (admin)"
    assert DeadLetter.objects.get(callback=pending).reason == "endpoint_disabled"

    staff.post(changelist("callbackendpoint"), {"action": "enable_selected", ACTION_CHECKBOX: [endpoint.pk]})
    staff.post(changelist("callbackendpoint"), {"action": "rotate_secret_selected", ACTION_CHECKBOX: [endpoint.pk]})
    endpoint.refresh_from_db()
    assert endpoint.enabled and endpoint.disabled_at is None
    assert [s["secret"] == old for s in endpoint.secrets] == [False, True] and endpoint.secrets[1]["expires_at"]


def test_staff_without_the_change_permission_see_no_endpoint_actions(client, client_key):
    user = User.objects.create_user("viewer", password="pw-for-tests", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_callbackendpoint", "view_callback"]))
    client.force_login(user)
    endpoint_make(client_key[0])
    page = client.get(changelist("callbackendpoint")).content.decode()
    assert "disable_selected" not in page
    client.post(changelist("callbackendpoint"), {"action": "disable_selected", ACTION_CHECKBOX: [1]})
    assert CallbackEndpoint.objects.get().enabled


def test_callbacks_are_listed_read_only_and_shown_on_their_message(staff, client_key, make_message):
    endpoint = endpoint_make(client_key[0])
    message = make_message()
    callback = callback_make(message, endpoint, sequence=3, event="delivered", attempt_log=[FAILED])
    page = staff.get(changelist("callback"), {"state__exact": "pending", "event__exact": "delivered"})
    assert page.status_code == 200 and callback.webhook_id in page.content.decode()
    page = staff.get(changelist("callback"), {"endpoint__id__exact": endpoint.pk, "q": callback.webhook_id})
    assert "1 callback" in page.content.decode()
    detail = staff.get(reverse("admin:messaging_callback_change", args=[callback.pk])).content.decode()
    assert "Service Unavailable" in detail and "message.delivered" in detail
    assert 'name="_save"' not in detail  # read-only
    message_page = staff.get(reverse("admin:messaging_message_change", args=[message.pk])).content.decode()
    assert "Callbacks" in message_page and callback.webhook_id in message_page
