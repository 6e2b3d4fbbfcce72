"""API v1 routes."""

from django.urls import path

from messaging.api import callback_views, route_views, suppression_views, views

urlpatterns = [
    path("messages/", views.MessageListCreateView.as_view(), name="message-list"),
    path("messages/batch/", views.MessageBatchView.as_view(), name="message-batch"),
    path("messages/<uuid:pk>/", views.MessageDetailView.as_view(), name="message-detail"),
    path("messages/<uuid:pk>/cancel/", views.MessageCancelView.as_view(), name="message-cancel"),
    path("dead-letters/", views.DeadLetterListView.as_view(), name="dead-letter-list"),
    path("dead-letters/replay/", views.DeadLetterReplayView.as_view(), name="dead-letter-replay"),
    path("dead-letters/<int:pk>/", views.DeadLetterDetailView.as_view(), name="dead-letter-detail"),
    path(
        "callback-endpoints/",
        callback_views.CallbackEndpointListCreateView.as_view(),
        name="callback-endpoint-list",
    ),
    path(
        "callback-endpoints/<int:pk>/",
        callback_views.CallbackEndpointDetailView.as_view(),
        name="callback-endpoint-detail",
    ),
    path(
        "callback-endpoints/<int:pk>/secret/",
        callback_views.CallbackEndpointSecretView.as_view(),
        name="callback-endpoint-secret",
    ),
    path(
        "callback-endpoints/<int:pk>/rotate-secret/",
        callback_views.CallbackEndpointRotateSecretView.as_view(),
        name="callback-endpoint-rotate-secret",
    ),
    path("suppressions/", suppression_views.SuppressionListCreateView.as_view(), name="suppression-list"),
    path("suppressions/import/", suppression_views.SuppressionImportView.as_view(), name="suppression-import"),
    path("suppressions/<int:pk>/", suppression_views.SuppressionDetailView.as_view(), name="suppression-detail"),
    # Operators only (Django staff), not API clients: messaging.api.route_views says why.
    path("routes/", route_views.RoutesView.as_view(), name="routes"),
    path("suppressions/<int:pk>/lift/", suppression_views.SuppressionLiftView.as_view(), name="suppression-lift"),
]
