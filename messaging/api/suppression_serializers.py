"""API shapes of a client's suppression list: what a client may give (each bad field named) and sees."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from messaging.api.serializers import RecipientField, StrictSerializer, no_control_characters
from messaging.models import Suppression, SuppressionReason
from messaging.routing import Channel
from messaging.suppressions.files import NOTE_MAX_LENGTH, SCOPE_MAX_LENGTH, address_normalized

SCOPE_HELP = (
    "A category (a message's `category`) the suppression covers alone. Empty: every category but the "
    "client's opt-out-exempt ones (ApiClient.opt_out_exempt_categories, else OPT_OUT_EXEMPT_CATEGORIES)."
)


class SuppressionSerializer(serializers.ModelSerializer):
    active = serializers.BooleanField(read_only=True, help_text="false once lifted (the row is kept).")

    class Meta:
        model = Suppression
        fields = [
            "id",
            "channel",
            "address",
            "scope",
            "reason",
            "covers_exempt",
            "source",
            "note",
            "active",
            "created_at",
            "lifted_at",
            "lifted_reason",
            "lifted_by",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "address": {"help_text": "E.164 for sms and whatsapp, the lower-cased address for email."},
            "scope": {"help_text": SCOPE_HELP},
            "covers_exempt": {
                "help_text": "The address cannot receive (a hard bounce, an invalid number): the opt-out-exempt "
                "categories are stopped too."
            },
            "source": {"help_text": "What reported it: api, api import, twilio 21610, mailgun, an admin user..."},
        }


class SuppressionCreateSerializer(StrictSerializer):
    channel = serializers.ChoiceField(choices=Channel.choices)
    address = RecipientField(max_length=320)
    scope = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=SCOPE_MAX_LENGTH,
        validators=[no_control_characters],
        help_text=SCOPE_HELP,
    )
    reason = serializers.ChoiceField(
        choices=[SuppressionReason.MANUAL],
        required=False,
        default=SuppressionReason.MANUAL,
        help_text="Only manual: the other reasons are recorded by Conductor itself (STOP, bounces, providers).",
    )
    note = serializers.CharField(required=False, allow_blank=True, default="", max_length=NOTE_MAX_LENGTH)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        try:
            attrs["address"] = address_normalized(attrs["channel"], attrs["address"])
        except ValueError as exc:
            raise serializers.ValidationError({"address": [str(exc)]}) from None
        return attrs


class SuppressionListQuerySerializer(serializers.Serializer):
    channel = serializers.ChoiceField(choices=Channel.choices, required=False)
    address = serializers.CharField(
        required=False, max_length=320, help_text="In any form a message's `to` takes (+1 415 555 2671 too)."
    )
    reason = serializers.ChoiceField(choices=SuppressionReason.choices, required=False)
    scope = serializers.CharField(required=False, allow_blank=True, max_length=SCOPE_MAX_LENGTH)
    active = serializers.BooleanField(required=False, allow_null=True, default=None)


class SuppressionLiftSerializer(StrictSerializer):
    reason = serializers.CharField(
        max_length=500,
        validators=[no_control_characters],
        help_text="Why it is lifted (kept on the row), e.g. 'the recipient asked to be sent to again'.",
    )


class SuppressionImportErrorSerializer(serializers.Serializer):
    line = serializers.IntegerField(help_text="The file's line (the header is line 1).")
    field = serializers.CharField(help_text="The column at fault (or `line`).")
    error = serializers.CharField()


class SuppressionImportResultSerializer(serializers.Serializer):
    added = serializers.IntegerField(help_text="New suppressions.")
    already = serializers.IntegerField(help_text="Lines already suppressed (same channel, address and scope).")
    errors = SuppressionImportErrorSerializer(many=True, help_text="Lines not imported, and why.")
