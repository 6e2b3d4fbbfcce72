"""Read-only admin for provider receipts."""

from django.contrib import admin

from reconciliation.models import Receipt


@admin.register(Receipt)
class ReceiptAdmin(admin.ModelAdmin):
    list_display = ["received_at", "provider", "provider_status", "mapped_state", "applied", "message"]
    list_filter = ["provider", "provider_status", "applied", "source"]
    search_fields = ["=provider_message_id", "=event_id"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False
