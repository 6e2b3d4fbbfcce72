"""Routes changed by hand: manage.py routes, the admin and the operators' API (staff only), each
through provider_route_set with source operator:<name> and a reason."""

from __future__ import annotations

import io

import pytest
from django.contrib.auth.models import Permission, User
from django.core.management import CommandError, call_command
from django.urls import reverse
from rest_framework.test import APIClient

from messaging.models import ProviderRoute, RoutingChange
from messaging.route_health import provider_route_set

pytestmark = pytest.mark.django_db

URL = "/api/v1/routes/"


def run(*args) -> str:
    out = io.StringIO()
    call_command("routes", *args, stdout=out)
    return out.getvalue()


def test_the_command_drains_for_one_country_then_restores_with_a_dry_run_first():
    dry = run("drain", "twilio", "--country", "us", "--reason", "carrier outage", "--operator", "ada", "--dry-run")
    assert "dry run: twilio (US): would change healthy -> drained" in dry
    assert not ProviderRoute.objects.exists() and not RoutingChange.objects.exists()
    assert "changed healthy -> drained" in run(
        "drain", "twilio", "--country", "US", "--reason", "carrier outage", "--operator", "ada"
    )
    route = ProviderRoute.objects.get()
    assert (route.provider, route.country, route.condition, route.source) == ("twilio", "US", "drained", "operator:ada")
    assert "unchanged" in run("drain", "twilio", "--country", "US", "--reason", "again", "--operator", "ada")
    run("restore", "twilio", "--country", "US", "--reason", "carrier back", "--operator", "ada")
    run("weight", "vonage", "3", "--reason", "split", "--operator", "ada")
    changes = list(
        RoutingChange.objects.order_by("pk").values_list("provider", "country", "to_condition", "to_weight", "reason")
    )
    assert changes == [
        ("twilio", "US", "drained", None, "carrier outage"),
        ("twilio", "US", "healthy", None, "carrier back"),
        ("vonage", "", "healthy", 3, "split"),
    ]
    listing = run("list")
    assert "sms: twilio -> vonage" in listing and "vonage" in listing and "carrier back" in listing
    assert run() == listing  # list is the default


@pytest.mark.parametrize(
    "args,field",
    [
        (["drain", "nosuch", "--reason", "x"], "provider"),
        (["drain", "twilio", "--country", "XX", "--reason", "x"], "country"),
        (["weight", "twilio", "lots", "--reason", "x"], "weight"),
        (["weight", "twilio", "5000", "--reason", "x"], "weight"),
        (["drain", "twilio", "--reason", "  "], "reason"),
    ],
)
def test_the_command_refuses_bad_input_naming_it(args, field):
    with pytest.raises(CommandError, match=f"^{field}: "):
        run(*args)
    assert not RoutingChange.objects.exists()


def test_the_commands_help_explains_drain_and_the_country():
    out = io.StringIO()
    command = __import__("messaging.management.commands.routes", fromlist=["Command"]).Command(stdout=out)
    text = command.create_parser("manage.py", "routes").format_help()
    assert "last resort" in text and "--country" in text and "--dry-run" in text


@pytest.fixture
def staff_user():
    return User.objects.create_user("ops", "ops@example.com", "pw-for-tests", is_staff=True)


def api_as(user: User | None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_login(user)
    return client


def test_the_api_refuses_non_staff_and_api_client_keys(api, staff_user):
    plain = User.objects.create_user("someone", "s@example.com", "pw-for-tests")
    assert api_as(None).get(URL).status_code == 401
    assert api_as(plain).get(URL).status_code == 403
    assert api.get(URL).status_code in (401, 403)  # a client's bearer key is not an operator
    body = {"provider": "twilio", "condition": "drained", "reason": "x"}
    assert api.post(URL, body, format="json").status_code in (401, 403)
    assert api_as(staff_user).post(URL, body, format="json").status_code == 403  # staff without the permission
    assert not RoutingChange.objects.exists()


def test_staff_with_the_permission_drain_by_basic_auth_and_see_it(staff_user):
    staff_user.user_permissions.add(Permission.objects.get(codename="change_providerroute"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Basic " + __import__("base64").b64encode(b"ops:pw-for-tests").decode())
    dry = client.post(
        URL,
        {"provider": "twilio", "country": "us", "condition": "drained", "reason": "outage", "dry_run": True},
        format="json",
    )
    assert dry.status_code == 200 and dry.json()["changed"] and dry.json()["dry_run"]
    assert not ProviderRoute.objects.exists()
    made = client.post(
        URL, {"provider": "twilio", "country": "US", "condition": "drained", "reason": "outage"}, format="json"
    )
    assert made.status_code == 200
    assert made.json() | {"change_id": None} == {
        "provider": "twilio",
        "country": "US",
        "from_condition": "healthy",
        "to_condition": "drained",
        "from_weight": None,
        "to_weight": None,
        "changed": True,
        "dry_run": False,
        "change_id": None,
    }
    listed = client.get(URL).json()
    assert listed["routes"][0]["condition"] == "drained" and listed["routes"][0]["source"] == "operator:ops"
    assert listed["changes"][0]["reason"] == "outage"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"provider": "nosuch", "condition": "drained", "reason": "x"}, "provider"),
        ({"provider": "twilio", "country": "XX", "condition": "drained", "reason": "x"}, "country"),
        ({"provider": "twilio", "condition": "off", "reason": "x"}, "condition"),
        ({"provider": "twilio", "weight": -1, "reason": "x"}, "weight"),
        ({"provider": "twilio", "reason": "x"}, "condition"),
        ({"provider": "twilio", "condition": "drained"}, "reason"),
        ({"provider": "twilio", "condition": "drained", "reason": "   "}, "reason"),
    ],
)
def test_the_api_answers_bad_input_with_a_400_naming_the_field(body, field):
    superuser = User.objects.create_superuser("root", "root@example.com", "pw-for-tests")
    response = api_as(superuser).post(URL, body, format="json")
    assert response.status_code == 400 and field in response.json(), response.json()


@pytest.fixture
def admin_client_logged_in(client):
    client.force_login(User.objects.create_superuser("ops", "ops@example.com", "pw-for-tests"))
    return client


def test_the_admin_changes_a_route_through_the_service_and_lists_the_changes(admin_client_logged_in):
    client = admin_client_logged_in
    add = reverse("admin:messaging_providerroute_add")
    response = client.post(
        add,
        {
            "provider": "twilio",
            "country": "gb",
            "condition": "drained",
            "weight": "",
            "change_reason": "GB carrier down",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    route = ProviderRoute.objects.get()
    assert (route.country, route.condition, route.source, route.reason) == (
        "GB",
        "drained",
        "operator:ops",
        "GB carrier down",
    )
    change_url = reverse("admin:messaging_providerroute_change", args=[route.pk])
    response = client.post(change_url, {"condition": "healthy", "weight": "2", "change_reason": "back, and split"})
    assert response.status_code == 302
    route.refresh_from_db()
    assert (route.condition, route.weight) == ("healthy", 2)
    assert RoutingChange.objects.count() == 2
    assert "back, and split" in client.get(reverse("admin:messaging_routingchange_changelist")).content.decode()
    assert client.get(reverse("admin:messaging_providerroute_changelist")).status_code == 200
    # The log is read-only, and a route row is not deleted.
    change = RoutingChange.objects.first()
    assert (
        client.post(reverse("admin:messaging_routingchange_delete", args=[change.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert client.get(reverse("admin:messaging_providerroute_delete", args=[route.pk])).status_code == 403


def test_the_admin_asks_for_a_reason_and_a_known_country(admin_client_logged_in):
    add = reverse("admin:messaging_providerroute_add")
    response = admin_client_logged_in.post(
        add, {"provider": "twilio", "country": "XX", "condition": "drained", "change_reason": ""}
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "country" in errors and "change_reason" in errors
    assert not RoutingChange.objects.exists()


def test_a_detector_change_shows_in_the_admin_with_its_source(admin_client_logged_in):
    provider_route_set(
        provider="vonage", country="US", condition="degraded", reason="receipts dropped 30 %", source="detector"
    )
    page = admin_client_logged_in.get(reverse("admin:messaging_providerroute_changelist")).content.decode()
    assert "receipts dropped 30 %" in page and "detector" in page
