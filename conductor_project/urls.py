"""URL routing: API v1, provider webhooks, health and metrics, the dashboard, schema and docs, admin."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from conductor_project import views
from messaging.suppressions.views import one_click_unsubscribe
from messaging.webhooks import provider_inbound_webhook, provider_webhook, routed_only
from providers.mailgun import MailgunTrackingView
from reconciliation.views import dashboard, dashboard_data_view

urlpatterns = [
    path("api/v1/", include("messaging.api.urls")),
    # anymail's tracking webhooks (Mailgun and any ESP anymail supports), signature-checked by anymail;
    # Mailgun's through anymail's view with replay protection (its signature leaves the body out).
    path(
        "webhooks/anymail/mailgun/tracking/",
        routed_only("mailgun", MailgunTrackingView.as_view()),
        name="mailgun-tracking-webhook",
    ),
    path("webhooks/anymail/", include("anymail.urls")),
    # Inbound messages (STOP, START, HELP): before the receipts' route, which must not take them.
    path("webhooks/<str:provider_name>/inbound/", provider_inbound_webhook, name="provider-inbound-webhook"),
    path("webhooks/<str:provider_name>/", provider_webhook, name="provider-webhook"),
    # One-click unsubscribe (RFC 8058) from an email's List-Unsubscribe link: no login, a signed token.
    path("unsubscribe/<str:token>/", one_click_unsubscribe, name="one-click-unsubscribe"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("livez/beat", views.livez_beat, name="livez-beat"),
    path("metrics", views.metrics, name="metrics"),
    path("dashboard/", dashboard, name="dashboard"),
    path("dashboard/data/", dashboard_data_view, name="dashboard-data"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
]

handler404 = "conductor_project.views.not_found"
