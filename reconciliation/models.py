"""Provider receipts (delivery reports), each stored once with its raw payload."""

from __future__ import annotations

from django.db import models

from messaging.models import Message


class Receipt(models.Model):
    """A status report from a provider, kept whether or not it changed the message."""

    provider = models.CharField(max_length=32)
    # Deduplicates re-sent callbacks; synthesised from message id and status where the provider has none.
    event_id = models.CharField(max_length=200)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, null=True, blank=True, related_name="receipts")
    provider_message_id = models.CharField(max_length=128, blank=True, default="")
    provider_status = models.CharField(max_length=64)
    mapped_state = models.CharField(max_length=16, blank=True, default="")
    error_code = models.CharField(max_length=64, blank=True, default="")
    applied = models.BooleanField(default=False)
    source = models.CharField(max_length=16, default="webhook")
    received_at = models.DateTimeField()
    payload = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "event_id"], name="receipt_unique_event_per_provider"),
        ]
        indexes = [
            models.Index(fields=["provider", "provider_message_id"], name="receipt_provider_ref"),
            models.Index(fields=["message", "received_at"], name="receipt_message_time"),
        ]

    def __str__(self) -> str:
        return f"{self.provider} {self.provider_status} for {self.provider_message_id}"
