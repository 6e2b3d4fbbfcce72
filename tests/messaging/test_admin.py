"""The admin through Django's test client: staff see and act, everyone else is refused."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from messaging.models import DeadLetter, DispatchAttempt, Message

pytestmark = pytest.mark.django_db

ACTION_CHECKBOX = "_selected_action"


@pytest.fixture
def staff(client):
    user = User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests")
    client.force_login(user)
    return client


@pytest.fixture
def viewer(client):
    """Staff who may look at messages and dead letters but holds no replay permission."""
    user = User.objects.create_user("viewer", password="pw-for-tests", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_message", "view_deadletter", "change_message"])
    )
    client.force_login(user)
    return client


@pytest.fixture
def outsider(client):
    user = User.objects.create_user("outsider", password="pw-for-tests", is_staff=False)
    client.force_login(user)
    return client


def changelist(model: str) -> str:
    return reverse(f"admin:messaging_{model}_changelist")


def change(model: str, pk) -> str:
    return reverse(f"admin:messaging_{model}_change", args=[pk])


def test_staff_see_messages_with_filters_search_and_the_timeline(staff, park, make_message):
    dead_letter = park(attempts=2, idempotency_key="order-42", category="otp")
    make_message(provider_message_id="SM-findme")
    response = staff.get(changelist("message"), {"state": "dead_lettered", "channel": "sms", "category": "otp"})
    assert response.status_code == 200
    assert str(dead_letter.message_id) in response.content.decode()
    for term in ("order-42", "SM-findme", str(dead_letter.message_id)):  # key, provider id, message id
        response = staff.get(changelist("message"), {"q": term})
        assert response.status_code == 200 and "1 result" in response.content.decode(), term
    detail = staff.get(change("message", dead_letter.message_id)).content.decode()
    assert "Dispatch attempts" in detail and "Message events" in detail and "Dead letters" in detail
    assert "given up in a test" in detail  # the event's detail in the timeline


def test_staff_see_dead_letters_with_their_filters_and_full_context(staff, park):
    timeout = park(error_type="provider_timeout", body="the original text", attempts=2)
    park(error_type="provider_5xx", provider="vonage")
    for query in ({"error_type": "provider_timeout"}, {"provider": "twilio"}, {"channel": "sms", "status": "parked"}):
        response = staff.get(changelist("deadletter"), query)
        assert response.status_code == 200
        assert f">{timeout.pk}<" in response.content.decode(), query
    response = staff.get(changelist("deadletter"), {"error_type": "provider_timeout"})
    assert "1 dead letter" in response.content.decode()
    detail = staff.get(change("deadletter", timeout.pk)).content.decode()
    assert "the original text" in detail and "transient_error" in detail  # payload and attempts
    assert 'name="_save"' not in detail  # read-only


def test_the_replay_action_on_dead_letters(staff, park):
    chosen, other = park(priority="bulk"), park(priority="bulk")
    response = staff.post(
        changelist("deadletter"), {"action": "replay_selected", ACTION_CHECKBOX: [chosen.pk]}, follow=True
    )
    assert response.status_code == 200 and "Replayed 1" in response.content.decode()
    chosen.refresh_from_db()
    other.refresh_from_db()
    assert chosen.replayed_by == "ops" and chosen.replayed_via == "admin" and other.is_parked
    assert Message.objects.get(pk=chosen.message_id).state == "accepted"


def test_the_forced_replay_action_sends_past_the_deadline(staff, park):
    from datetime import timedelta

    from django.utils import timezone

    stale = park(priority="critical", expires_at=timezone.now() - timedelta(minutes=1))
    response = staff.post(
        changelist("deadletter"), {"action": "replay_selected", ACTION_CHECKBOX: [stale.pk]}, follow=True
    )
    assert "1 past deadline" in response.content.decode()
    staff.post(changelist("deadletter"), {"action": "replay_selected_forced", ACTION_CHECKBOX: [stale.pk]})
    assert not DeadLetter.objects.get(pk=stale.pk).is_parked


def test_the_replay_action_on_messages(staff, park, make_message):
    dead_letter = park(priority="bulk")
    fine = make_message(state="delivered")
    response = staff.post(
        changelist("message"),
        {"action": "replay_selected", ACTION_CHECKBOX: [dead_letter.message_id, fine.pk]},
        follow=True,
    )
    page = response.content.decode()
    assert "Replayed 1" in page and "1 of the selected messages have no parked dead letter" in page
    assert Message.objects.get(pk=dead_letter.message_id).send_generation == 2
    assert Message.objects.get(pk=fine.pk).state == "delivered"


def test_the_cancel_action_records_who_cancelled(staff, make_message):
    message = make_message()
    staff.post(changelist("message"), {"action": "cancel_selected", ACTION_CHECKBOX: [message.pk]})
    message.refresh_from_db()
    event = message.events.latest("id")
    assert message.state == "cancelled" and event.source == "admin" and event.detail == "cancelled by ops"


def test_staff_who_may_only_view_messages_cannot_cancel_them(client, make_message):
    user = User.objects.create_user("looker", password="pw-for-tests", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_message", "view_deadletter"]))
    client.force_login(user)
    message = make_message()
    page = client.get(changelist("message")).content.decode()
    assert str(message.pk) in page and "cancel_selected" not in page
    client.post(changelist("message"), {"action": "cancel_selected", ACTION_CHECKBOX: [message.pk]})
    message.refresh_from_db()
    assert message.state == "accepted" and not message.events.filter(source="admin").exists()


def test_staff_without_the_replay_permission_cannot_replay(viewer, park):
    dead_letter = park(priority="bulk")
    page = viewer.get(changelist("deadletter")).content.decode()
    assert f">{dead_letter.pk}<" in page and "replay_selected" not in page
    viewer.post(changelist("deadletter"), {"action": "replay_selected", ACTION_CHECKBOX: [dead_letter.pk]})
    viewer.post(changelist("message"), {"action": "replay_selected", ACTION_CHECKBOX: [dead_letter.message_id]})
    dead_letter.refresh_from_db()
    assert dead_letter.is_parked


def test_everyone_else_is_sent_to_the_login_page_and_changes_nothing(outsider, client, park):
    dead_letter = park(priority="bulk")
    for url in (
        changelist("message"),
        change("message", dead_letter.message_id),
        changelist("deadletter"),
        change("deadletter", dead_letter.pk),
    ):
        response = outsider.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"], url
    response = outsider.post(changelist("deadletter"), {"action": "replay_selected", ACTION_CHECKBOX: [dead_letter.pk]})
    assert response.status_code == 302
    client.logout()
    assert client.get(changelist("deadletter")).status_code == 302
    dead_letter.refresh_from_db()
    assert dead_letter.is_parked and DispatchAttempt.objects.filter(message_id=dead_letter.message_id).count() == 1


def test_staff_see_alerts_and_reconciliation_runs_and_others_do_not(staff, client):
    from django.utils import timezone

    from reconciliation.models import Alert, ReconciliationRun

    now = timezone.now()
    Alert.objects.create(
        kind="receipt_rate_drop", channel="sms", provider="twilio", severity="critical", observed=0.8,
        baseline=0.98, recent_samples=1200, baseline_samples=72000, score=20.0, window_start=now,
        window_end=now, opened_at=now, last_seen_at=now,
    )  # fmt: skip
    ReconciliationRun.objects.create(
        window_start=now, window_end=now, trigger="beat", started_at=now, checked=1000, updated=50
    )
    for name in ("alert", "reconciliationrun"):
        url = reverse(f"admin:reconciliation_{name}_changelist")
        page = staff.get(url, {"status": "open"} if name == "alert" else {})
        assert page.status_code == 200 and ("receipt_rate_drop" in page.content.decode() or name != "alert")
        staff.logout()
        assert client.get(url).status_code == 302
        staff.force_login(User.objects.get(username="ops"))


def test_staff_set_a_clients_limits_in_the_admin(staff, client_key):
    api_client = client_key[0]
    page = staff.get(change("apiclient", api_client.pk))
    assert page.status_code == 200 and b"sms_daily_quota" in page.content and b"allowed_priorities" in page.content
    form = {
        "name": api_client.name,
        "api_rate": "20/s",
        "sms_daily_quota": "100000",
        "whatsapp_daily_quota": "",
        "email_daily_quota": "",
        "allowed_priorities": ["transactional", "bulk"],
        "keys-TOTAL_FORMS": "0",
        "keys-INITIAL_FORMS": "0",
    }
    response = staff.post(change("apiclient", api_client.pk), form)
    assert response.status_code == 302, response.content[:2000]
    api_client.refresh_from_db()
    assert (api_client.api_rate, api_client.sms_daily_quota, api_client.whatsapp_daily_quota) == ("20/s", 100000, None)
    assert api_client.allowed_priorities == ["transactional", "bulk"]
    # A rate DRF could not read is refused with the field named.
    refused = staff.post(change("apiclient", api_client.pk), {**form, "api_rate": "fast"})
    assert refused.status_code == 200 and b"is not a rate" in refused.content


def test_staff_filter_messages_waiting_for_their_time(staff, make_message):
    """Scheduled (send_at ahead) and held back (quiet hours, backoff) are told apart."""
    from datetime import timedelta

    from django.utils import timezone

    later = timezone.now() + timedelta(hours=2)
    scheduled = make_message(send_at=later, next_attempt_at=later, enqueued_at=None, body="scheduled one")
    held = make_message(next_attempt_at=later, enqueued_at=None, body="held one")
    due = make_message(body="due one")
    shown = {}
    for value in ("scheduled", "held"):
        response = staff.get(changelist("message"), {"waiting": value})
        assert response.status_code == 200
        shown[value] = response.content.decode()
    assert str(scheduled.pk) in shown["scheduled"] and str(held.pk) not in shown["scheduled"]
    assert str(held.pk) in shown["held"] and str(scheduled.pk) not in shown["held"]
    assert str(due.pk) not in shown["scheduled"] + shown["held"]


def test_staff_set_a_clients_quiet_hours(staff, client_key):
    page = staff.get(change("apiclient", client_key[0].pk)).content.decode()
    assert "Quiet hours" in page and "quiet_hours" in page
