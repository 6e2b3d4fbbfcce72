"""Staff-only admin: messages with read-only attempt and event timelines, clients and keys."""

from __future__ import annotations

from django.contrib import admin
from django.contrib import messages as flash

from messaging.models import ApiClient, ApiKey, DispatchAttempt, Message, MessageEvent
from messaging.services import NotCancellable, message_cancel


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class AttemptInline(ReadOnlyInline):
    model = DispatchAttempt
    fields = [
        "number",
        "send_generation",
        "provider",
        "started_at",
        "ended_at",
        "outcome",
        "error_type",
        "error_code",
        "latency_ms",
        "provider_message_id",
    ]
    readonly_fields = fields


class EventInline(ReadOnlyInline):
    model = MessageEvent
    fields = ["created_at", "source", "from_state", "to_state", "applied", "detail"]
    readonly_fields = fields


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "client",
        "channel",
        "priority",
        "state",
        "provider",
        "category",
        "attempt_count",
        "created_at",
    ]
    list_filter = ["state", "channel", "priority", "provider", "category", "created_at"]
    search_fields = ["=id", "=idempotency_key", "=provider_message_id"]
    date_hierarchy = "created_at"
    inlines = [AttemptInline, EventInline]
    actions = ["cancel_selected"]
    list_select_related = ["client"]

    def get_readonly_fields(self, request, obj=None):
        # The state only changes through the transition service, never by editing the row.
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.action(description="Cancel selected messages (only those not yet dispatched)")
    def cancel_selected(self, request, queryset) -> None:
        cancelled = refused = 0
        for message in queryset:
            try:
                message_cancel(message=message)
                cancelled += 1
            except NotCancellable:
                refused += 1
        self.message_user(
            request,
            f"Cancelled {cancelled}; {refused} could no longer be cancelled.",
            flash.SUCCESS if not refused else flash.WARNING,
        )


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ["prefix", "is_active", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # keys are created by `manage.py create_api_key` so the raw key is shown once


@admin.register(ApiClient)
class ApiClientAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    inlines = [ApiKeyInline]
