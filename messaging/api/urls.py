"""API v1 routes."""

from django.urls import path

from messaging.api import views

urlpatterns = [
    path("messages/", views.MessageListCreateView.as_view(), name="message-list"),
    path("messages/batch/", views.MessageBatchView.as_view(), name="message-batch"),
    path("messages/<uuid:pk>/", views.MessageDetailView.as_view(), name="message-detail"),
    path("messages/<uuid:pk>/cancel/", views.MessageCancelView.as_view(), name="message-cancel"),
]
