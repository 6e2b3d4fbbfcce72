"""API input validation (every bad field named, nothing stored) and output shapes."""

from __future__ import annotations

import json

import phonenumbers
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from django.utils import timezone
from rest_framework import serializers

from messaging.conf import conductor_setting
from messaging.models import DispatchAttempt, Message, MessageEvent
from messaging.routing import Channel, Priority
from reconciliation.models import Receipt

PHONE_CHANNELS = {Channel.SMS, Channel.WHATSAPP}


def normalize_recipient(channel: str, value: str) -> str:
    """E.164 for phone channels (phonenumbers), a valid address for email; raises ValidationError."""
    value = value.strip()
    if channel in PHONE_CHANNELS:
        if value.startswith("whatsapp:"):
            value = value[len("whatsapp:") :]
        if not value.startswith("+"):
            raise serializers.ValidationError("Give the number in E.164 format, e.g. +14155552671.")
        try:
            number = phonenumbers.parse(value, None)
        except phonenumbers.NumberParseException as exc:
            raise serializers.ValidationError(f"Not a phone number: {exc}.") from None
        if not phonenumbers.is_valid_number(number):
            raise serializers.ValidationError("Not a valid phone number (checked against the numbering plan).")
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    try:
        validate_email(value)
    except DjangoValidationError:
        raise serializers.ValidationError("Not a valid email address.") from None
    return value


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a typo ('priorty') is a 400, not silently ignored."""

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class MessageCreateSerializer(StrictSerializer):
    channel = serializers.ChoiceField(choices=Channel.choices)
    to = serializers.CharField(max_length=320)
    body = serializers.CharField(trim_whitespace=False)
    subject = serializers.CharField(required=False, allow_blank=True, max_length=998)
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.TRANSACTIONAL)
    category = serializers.CharField(required=False, allow_blank=True, max_length=100)
    idempotency_key = serializers.CharField(required=False, max_length=255)
    ordering_key = serializers.CharField(required=False, max_length=255)
    expires_at = serializers.DateTimeField(required=False)
    ttl_seconds = serializers.IntegerField(required=False, min_value=1)
    fallback_channels = serializers.ListField(child=serializers.ChoiceField(choices=Channel.choices), required=False)
    fallback_to = serializers.DictField(child=serializers.CharField(max_length=320), required=False)
    metadata = serializers.DictField(required=False)

    def validate(self, attrs):
        errors: dict[str, list[str]] = {}
        channel = attrs["channel"]
        if not conductor_setting("ROUTES").get(channel):
            errors["channel"] = [f"No provider is configured for channel {channel!r}."]
        try:
            attrs["to"] = normalize_recipient(channel, attrs["to"])
        except serializers.ValidationError as exc:
            errors["to"] = exc.detail
        limit = conductor_setting("BODY_MAX_LENGTH")[channel]
        if len(attrs["body"]) > limit:
            errors["body"] = [
                f"Ensure this field has no more than {limit} characters for {channel} (it has {len(attrs['body'])})."
            ]
        if "expires_at" in attrs and "ttl_seconds" in attrs:
            errors["ttl_seconds"] = ["Give either expires_at or ttl_seconds, not both."]
        elif "expires_at" in attrs and attrs["expires_at"] <= timezone.now():
            errors["expires_at"] = ["This deadline is already in the past."]
        self._validate_fallback(attrs, errors)
        metadata = attrs.get("metadata", {})
        if len(json.dumps(metadata)) > conductor_setting("METADATA_MAX_BYTES"):
            errors["metadata"] = [f"Metadata is limited to {conductor_setting('METADATA_MAX_BYTES')} bytes of JSON."]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs

    def _validate_fallback(self, attrs, errors) -> None:
        channels = attrs.get("fallback_channels", [])
        addresses = dict(attrs.get("fallback_to", {}))
        if len(set(channels)) != len(channels) or attrs["channel"] in channels:
            errors["fallback_channels"] = ["List each fallback channel once, and not the message's own channel."]
            return
        for name in sorted(set(addresses) - set(channels)):
            errors.setdefault("fallback_to", []).append(f"{name!r} is not in fallback_channels.")
        for name in channels:
            if name not in addresses:
                errors.setdefault("fallback_to", []).append(f"Give the {name} address to fall back to.")
                continue
            try:
                addresses[name] = normalize_recipient(name, addresses[name])
            except serializers.ValidationError as exc:
                errors.setdefault("fallback_to", []).append(f"{name}: {exc.detail[0]}")
        attrs["fallback_to"] = addresses


class BatchSerializer(StrictSerializer):
    messages = serializers.ListField(child=serializers.JSONField(), allow_empty=False)

    def validate_messages(self, items):
        limit = conductor_setting("BATCH_MAX_ITEMS")
        if len(items) > limit:
            raise serializers.ValidationError(f"A batch holds at most {limit} messages; this one has {len(items)}.")
        return items


class AttemptSerializer(serializers.ModelSerializer):
    class Meta:
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
            "error_message",
            "latency_ms",
            "provider_message_id",
        ]


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = MessageEvent
        fields = ["created_at", "source", "from_state", "to_state", "applied", "detail"]


class ReceiptSerializer(serializers.ModelSerializer):
    class Meta:
        model = Receipt
        fields = [
            "received_at",
            "provider",
            "provider_status",
            "mapped_state",
            "error_code",
            "applied",
            "source",
            "payload",
        ]


class MessageSerializer(serializers.ModelSerializer):
    last_error = serializers.SerializerMethodField()

    class Meta:
        model = Message
        fields = [
            "id",
            "channel",
            "to",
            "subject",
            "body",
            "priority",
            "category",
            "idempotency_key",
            "ordering_key",
            "state",
            "expires_at",
            "fallback_channels",
            "fallback_to",
            "metadata",
            "send_generation",
            "attempt_count",
            "next_attempt_at",
            "provider",
            "provider_message_id",
            "last_error",
            "created_at",
            "accepted_at",
            "dispatched_at",
            "delivered_at",
            "read_at",
            "undelivered_at",
            "failed_at",
            "expired_at",
            "cancelled_at",
            "dead_lettered_at",
        ]

    def get_last_error(self, message: Message) -> dict[str, str] | None:
        if not message.last_error_type:
            return None
        return {"type": message.last_error_type, "code": message.last_error_code, "message": message.last_error_message}


class MessageDetailSerializer(MessageSerializer):
    attempts = AttemptSerializer(many=True, read_only=True)
    events = EventSerializer(many=True, read_only=True)
    receipts = ReceiptSerializer(many=True, read_only=True)

    class Meta(MessageSerializer.Meta):
        fields = MessageSerializer.Meta.fields + ["attempts", "events", "receipts"]
