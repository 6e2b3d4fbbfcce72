"""API shapes of callback endpoints: what a client may set (each bad field named) and what it sees."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from rest_framework import serializers

from messaging.api.serializers import StrictSerializer, no_control_characters
from messaging.callbacks.destinations import host_problem
from messaging.models import CallbackEndpoint, CallbackEvent

URL_MAX_LENGTH = CallbackEndpoint._meta.get_field("url").max_length
DESCRIPTION_MAX_LENGTH = CallbackEndpoint._meta.get_field("description").max_length


class CallbackUrlField(serializers.URLField):
    """An http(s) URL with a host and no credentials (they would travel in every log line)."""

    def to_internal_value(self, data: Any) -> str:
        url = super().to_internal_value(data)
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise serializers.ValidationError("Give an http or https URL.")
        if parts.username or parts.password:
            raise serializers.ValidationError("No user name or password in the URL: callbacks are signed instead.")
        problem = host_problem(parts.hostname or "")
        if problem is not None:
            raise serializers.ValidationError(problem)
        return url


def events_validate(events: list[str]) -> list[str]:
    if len(set(events)) != len(events):
        raise serializers.ValidationError("List each event once.")
    return events


EVENTS_HELP = (
    "The events to send (message.<event>): any of " + ", ".join(CallbackEvent.values) + ". Empty: every event."
)


class CallbackEndpointCreateSerializer(StrictSerializer):
    url = CallbackUrlField(max_length=URL_MAX_LENGTH, help_text="Where callbacks are POSTed (http or https).")
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=CallbackEvent.choices),
        required=False,
        default=list,
        max_length=len(CallbackEvent.values),
        help_text=EVENTS_HELP,
    )
    description = serializers.CharField(
        required=False, allow_blank=True, max_length=DESCRIPTION_MAX_LENGTH, validators=[no_control_characters]
    )
    enabled = serializers.BooleanField(required=False, default=True)

    def validate_events(self, events: list[str]) -> list[str]:
        return events_validate(events)


class CallbackEndpointUpdateSerializer(StrictSerializer):
    url = CallbackUrlField(max_length=URL_MAX_LENGTH, required=False)
    events = serializers.ListField(
        child=serializers.ChoiceField(choices=CallbackEvent.choices),
        required=False,
        max_length=len(CallbackEvent.values),
        help_text=EVENTS_HELP,
    )
    description = serializers.CharField(
        required=False, allow_blank=True, max_length=DESCRIPTION_MAX_LENGTH, validators=[no_control_characters]
    )
    enabled = serializers.BooleanField(
        required=False,
        help_text="false: no new callbacks, and the pending ones become dead letters (replay them once it "
        "is enabled again). true: enabled with its failure run forgotten.",
    )
    per_message = serializers.BooleanField(
        required=False,
        help_text="true: only for messages naming it as their callback_url; false: for all your messages.",
    )

    def validate_events(self, events: list[str]) -> list[str]:
        return events_validate(events)


class CallbackEndpointSerializer(serializers.ModelSerializer):
    events = serializers.ListField(child=serializers.ChoiceField(choices=CallbackEvent.choices), help_text=EVENTS_HELP)

    class Meta:
        model = CallbackEndpoint
        fields = [
            "id",
            "url",
            "description",
            "events",
            "enabled",
            "per_message",
            "failing_since",
            "disabled_at",
            "disabled_reason",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields
        extra_kwargs = {
            "per_message": {"help_text": "Registered by a message's callback_url: used for such messages only."},
            "failing_since": {"help_text": "Every callback since this time failed (null: the last one succeeded)."},
            "disabled_reason": {"help_text": "Why it was disabled (by you, an operator, or after failing too long)."},
        }


class CallbackSecretSerializer(serializers.Serializer):
    secret = serializers.CharField(
        help_text='"whsec_" and the base64 of the key: give it to your Standard Webhooks verifier.'
    )
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(allow_null=True, help_text="Stops signing then (after a rotation).")


class CallbackEndpointCreatedSerializer(CallbackEndpointSerializer):
    secret = serializers.CharField(read_only=True, help_text="The signing secret (also at .../secret/).")

    class Meta(CallbackEndpointSerializer.Meta):
        fields = [*CallbackEndpointSerializer.Meta.fields, "secret"]
        read_only_fields = fields


class CallbackEndpointSecretsSerializer(serializers.Serializer):
    secret = serializers.CharField(help_text="The newest secret: verify with it (and any other listed).")
    secrets = CallbackSecretSerializer(
        many=True, help_text="Every secret signing now, newest first: during a rotation each request is signed by all."
    )
