"""URL routing: API v1, provider webhooks, health and metrics, schema and docs, admin."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from conductor_project import views
from providers.webhooks import provider_webhook

urlpatterns = [
    path("api/v1/", include("messaging.api.urls")),
    # anymail's tracking webhooks (Mailgun and any ESP anymail supports), signature-checked by anymail.
    path("webhooks/anymail/", include("anymail.urls")),
    path("webhooks/<str:provider_name>/", provider_webhook, name="provider-webhook"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("admin/", admin.site.urls),
]
