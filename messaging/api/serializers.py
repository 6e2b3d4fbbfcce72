"""API input validation (every bad field named, nothing stored) and output shapes."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, tzinfo
from typing import Any
from urllib.parse import urlsplit

import phonenumbers
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import RegexValidator, URLValidator, validate_email
from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import ISO_8601, serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.settings import api_settings

from messaging.callbacks.destinations import host_problem
from messaging.conf import messaging_setting
from messaging.dead_letters import ATTEMPT_FIELDS
from messaging.models import (
    ApiClient,
    Callback,
    CallbackEvent,
    DeadLetter,
    DeadLetterKind,
    DispatchAttempt,
    ErrorType,
    Message,
    MessageEvent,
    OrderingMode,
    Receipt,
)
from messaging.quiet_hours import valid_time_zone_names
from messaging.routing import Channel, Priority
from messaging.selectors import DeadLetterCriteria
from messaging.states import DEAD_LETTER_STATE_CHOICES, MessageState

PHONE_CHANNELS = {Channel.SMS, Channel.WHATSAPP}

# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators: str.splitlines()
# breaks a line at each of them, so in a subject they split the email header (SMTP then refuses the
# message), and in a category or key they break the log lines and metric labels that carry them.
_NO_CONTROL = r"\A[^\x00-\x1f\x7f-\x9f\u2028\u2029]*\Z"
_NO_CONTROL_BUT_TAB = r"\A[^\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]*\Z"  # a subject may hold a tab
no_control_characters = RegexValidator(
    _NO_CONTROL, "Control characters and line breaks are not allowed here.", code="control_characters"
)
no_line_breaks = RegexValidator(
    _NO_CONTROL_BUT_TAB, "Line breaks and control characters are not allowed in a subject.", code="line_breaks"
)
NO_CONTROL_SCHEMA_PATTERN = r"^[^\u0000-\u001f\u007f-\u009f\u2028\u2029]*$"  # _NO_CONTROL as ECMA-262
_HAS_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HAS_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
# What the schema says of a phone number: E.164 (the API also takes it formatted, e.g. +1 (415) 555-2671,
# or with WhatsApp's "whatsapp:" prefix, and answers it as E.164).
E164_PATTERN = r"^(whatsapp:)?\+[1-9][0-9]{1,14}$"
IDEMPOTENCY_KEY_MAX_LENGTH = 255
CALLBACK_URL_MAX_LENGTH = 2000  # CallbackEndpoint.url
BIGINT_MAX = 2**63 - 1
# A Twilio Content SID: what ContentSid takes (its API refuses anything else).
CONTENT_SID_PATTERN = r"^HX[0-9a-fA-F]{32}$"
# Template variables: Twilio's ContentVariables is one form field of JSON; WhatsApp templates hold
# a few dozen placeholders at most, each a short text (Meta caps a body at 1,024 characters).
TEMPLATE_VARIABLES_MAX_ITEMS = 100
TEMPLATE_VARIABLE_KEY_MAX_LENGTH = 64
TEMPLATE_VARIABLES_MAX_BYTES = 8192


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


_url_shape = URLValidator(schemes=["http", "https"])


def callback_url_problem(url: str) -> str | None:
    """Why a status-callback URL cannot be used, or None: an absolute https URL (http too in sandbox
    mode or with DEBUG, for receivers on a developer's machine)."""
    try:
        _url_shape(url)
    except DjangoValidationError:
        return "Enter a valid absolute URL (https://...)."
    if url.split(":", 1)[0].lower() != "https" and not (settings.CONDUCTOR_MODE == "sandbox" or settings.DEBUG):
        return "Callbacks are only sent to https:// URLs (http is allowed in sandbox mode only)."
    return host_problem(urlsplit(url).hostname or "")


def validate_time_zone_name(name: str) -> None:
    if name and name not in valid_time_zone_names():
        raise serializers.ValidationError(
            f"{name!r} is not an IANA time zone name (e.g. Europe/London, America/New_York, Asia/Kolkata)."
        )


def validate_callback_url(url: str) -> None:
    problem = callback_url_problem(url)
    if problem is not None:
        raise serializers.ValidationError(problem)


class StrictSerializer(serializers.Serializer):
    """Rejects fields it does not know, so a typo ('priorty') is a 400, not silently ignored."""

    def to_internal_value(self, data):
        if not isinstance(data, dict):
            raise serializers.ValidationError({"non_field_errors": ["Expected a JSON object."]})
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


@extend_schema_field(
    {
        "type": "string",
        "maxLength": 320,
        "anyOf": [{"pattern": E164_PATTERN}, {"format": "email"}],
        "description": "sms and whatsapp: a phone number in E.164 (e.g. +14155552671); email: an address.",
    }
)
class RecipientField(serializers.CharField):
    """A recipient: what the schema says of it (checked against the channel in validate())."""


@extend_schema_field(
    {
        "type": "string",
        "minLength": 1,
        "maxLength": max(messaging_setting("BODY_MAX_LENGTH").values()),
        "description": "At most BODY_MAX_LENGTH characters for the channel: by default sms 1,600, "
        "whatsapp 4,096, email 262,144. No NUL character.",
    }
)
class BodyField(serializers.CharField):
    """The body: its limit depends on the channel (checked in validate()); the schema gives the largest."""


class TextOnlyField(serializers.CharField):
    """A CharField that takes text only: a number is refused, not turned into its digits."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class MessageCreateSerializer(StrictSerializer):
    channel = serializers.ChoiceField(choices=Channel.choices)
    to = RecipientField(max_length=320)
    body = BodyField(
        trim_whitespace=False,
        required=False,
        help_text="Required unless a template is given; with one, the text of the message's other "
        "channels' hops (its SMS or email fallback; then required), else kept for display only.",
    )
    template = serializers.RegexField(
        CONTENT_SID_PATTERN,
        required=False,
        max_length=34,
        error_messages={"invalid": "Give a Twilio Content SID: HX and 32 hexadecimal digits."},
        help_text="WhatsApp only: an approved template's Twilio Content SID (HX...), sent instead of the body, "
        "and the only kind of message WhatsApp takes outside the 24-hour session window (docs/whatsapp.md). "
        "The message's channel or one of its fallback_channels must be whatsapp.",
    )
    variables = serializers.DictField(
        child=TextOnlyField(trim_whitespace=False),
        required=False,
        help_text=f'With template: its variables, e.g. {{"1": "Ada"}} (string keys and values; at most '
        f"{TEMPLATE_VARIABLES_MAX_ITEMS} of them, {TEMPLATE_VARIABLES_MAX_BYTES} bytes of JSON).",
    )
    subject = serializers.CharField(required=False, allow_blank=True, max_length=998, validators=[no_line_breaks])
    priority = serializers.ChoiceField(choices=Priority.choices, default=Priority.TRANSACTIONAL)
    category = serializers.CharField(
        required=False, allow_blank=True, max_length=100, validators=[no_control_characters]
    )
    idempotency_key = serializers.CharField(
        required=False,
        max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
        validators=[no_control_characters],
        help_text="Or the Idempotency-Key header (the same value if both are given).",
    )
    ordering_key = serializers.CharField(required=False, max_length=255, validators=[no_control_characters])
    ordering_mode = serializers.ChoiceField(
        choices=OrderingMode.choices,
        required=False,
        help_text="With ordering_key: send after the previous message with the key is dispatched (default) "
        "or, stricter, delivered (or ORDERING_RECEIPT_TIMEOUT_SECONDS passed).",
    )
    expires_at = serializers.DateTimeField(required=False)
    send_at = serializers.DateTimeField(
        required=False,
        help_text="Send no earlier than this (ISO 8601; scheduled send). At most TTL_MAX_SECONDS ahead and "
        "before expires_at; a ttl_seconds (or the policy's TTL) counts from it. Up to "
        "SEND_AT_PAST_TOLERANCE_SECONDS (300) in the past is sent at once; further back is refused. "
        "Not with ordering_key. docs/scheduling.md.",
    )
    ttl_seconds = serializers.IntegerField(
        required=False, min_value=1, max_value=messaging_setting("TTL_MAX_SECONDS"), help_text="Or expires_at."
    )
    fallback_channels = serializers.ListField(child=serializers.ChoiceField(choices=Channel.choices), required=False)
    fallback_to = serializers.DictField(child=RecipientField(max_length=320), required=False)
    timezone = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=64,  # Message.recipient_timezone
        validators=[validate_time_zone_name],
        help_text="The recipient's IANA time zone (e.g. Europe/London), for quiet hours (docs/quiet-hours.md). "
        "Default: the phone number's zone(s), the most conservative when it spans several; none for email.",
    )
    metadata = serializers.DictField(
        required=False,
        help_text="Any JSON object: at most METADATA_MAX_BYTES (16,384) bytes of JSON, JSON_MAX_DEPTH (64) "
        "levels deep in the request; no NUL character or unpaired surrogate in its text.",
    )
    callback_url = serializers.CharField(
        required=False,
        max_length=CALLBACK_URL_MAX_LENGTH,
        validators=[validate_callback_url],
        help_text="Status callbacks of this message go to this URL (https; http in sandbox mode) and to none "
        "of the client's endpoints; registered as the client's endpoint for it on first use, signed with "
        "that endpoint's secret.",
    )
    callback_events = serializers.ListField(
        child=serializers.ChoiceField(choices=CallbackEvent.choices),
        required=False,
        allow_empty=False,
        min_length=1,  # as allow_empty, for the schema
        help_text="With callback_url: the events to report (default: the endpoint's, all for a new one).",
    )

    def to_internal_value(self, data):
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError as exc:
            # body is required unless a template is given: named with the other missing fields
            # (validate(), which says so otherwise, does not run when a field is wrong).
            if isinstance(data, dict) and isinstance(exc.detail, dict) and not {"body", "template"} & set(data):
                exc.detail.setdefault("body", [ErrorDetail("This field is required.", code="required")])
            raise

    def validate_callback_events(self, events: list[str]) -> list[str]:
        return list(dict.fromkeys(events))  # each once, in the given order

    def validate(self, attrs):
        errors: dict[str, list[str]] = {}
        channel = attrs["channel"]
        if not messaging_setting("ROUTES").get(channel):
            errors["channel"] = [f"No provider is configured for channel {channel!r}."]
        try:
            attrs["to"] = normalize_recipient(channel, attrs["to"])
        except serializers.ValidationError as exc:
            errors["to"] = exc.detail
        limit = messaging_setting("BODY_MAX_LENGTH")[channel]
        if "body" in attrs and len(attrs["body"]) > limit:
            errors["body"] = [
                f"Ensure this field has no more than {limit} characters for {channel} (it has {len(attrs['body'])})."
            ]
        self._validate_template(attrs, errors)
        if "ordering_mode" in attrs and not attrs.get("ordering_key"):
            errors["ordering_mode"] = ["Give an ordering_key too: the mode says how to wait for its previous message."]
        if "callback_events" in attrs and not attrs.get("callback_url"):
            errors["callback_events"] = ["Give a callback_url too: the events say what to report to it."]
        if "expires_at" in attrs and "ttl_seconds" in attrs:
            errors["ttl_seconds"] = ["Give either expires_at or ttl_seconds, not both."]
        elif "expires_at" in attrs and attrs["expires_at"] <= timezone.now():
            errors["expires_at"] = ["This deadline is already in the past."]
        if "send_at" in attrs:
            problem = send_at_problem(attrs)
            if problem is not None:
                errors["send_at"] = [problem]
        self._validate_fallback(attrs, errors)
        metadata = attrs.get("metadata", {})
        unstorable = unstorable_json_text(metadata)
        if unstorable is not None:
            errors["metadata"] = [unstorable]
        elif len(json.dumps(metadata)) > messaging_setting("METADATA_MAX_BYTES"):
            errors["metadata"] = [f"Metadata is limited to {messaging_setting('METADATA_MAX_BYTES')} bytes of JSON."]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs

    def _validate_template(self, attrs, errors) -> None:
        """A template goes to the message's WhatsApp hop, so WhatsApp must be among its channels;
        without one the body is required, and with one whenever another channel's hop needs text."""
        channels = [attrs["channel"], *attrs.get("fallback_channels", [])]
        if "template" not in attrs:
            if "variables" in attrs:
                errors["variables"] = ["Give a template too: the variables fill its placeholders."]
            if "body" not in attrs:
                errors.setdefault("body", ["This field is required."])
            return
        if Channel.WHATSAPP not in channels:
            errors["template"] = [
                "A template is sent on WhatsApp only: use channel whatsapp, or list it in fallback_channels."
            ]
        elif "body" not in attrs and any(name != Channel.WHATSAPP for name in channels):
            others = ", ".join(sorted({name for name in channels if name != Channel.WHATSAPP}))
            errors.setdefault("body", [f"Give a body too: the {others} hop of this message sends it."])
        variables = attrs.get("variables", {})
        problem = _template_variables_problem(variables)
        if problem is not None:
            errors["variables"] = [problem]

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


def _template_variables_problem(variables: dict[str, str]) -> str | None:
    """Why these template variables cannot be sent, or None."""
    if len(variables) > TEMPLATE_VARIABLES_MAX_ITEMS:
        return f"At most {TEMPLATE_VARIABLES_MAX_ITEMS} variables (this has {len(variables)})."
    for key in variables:
        if not key or len(key) > TEMPLATE_VARIABLE_KEY_MAX_LENGTH or _HAS_CONTROL.search(key):
            return (
                f"The key {_shown(key)} is not a placeholder name: 1 to {TEMPLATE_VARIABLE_KEY_MAX_LENGTH} "
                "characters, no control characters."
            )
    unstorable = unstorable_json_text(variables)
    if unstorable is not None:
        return unstorable
    if len(json.dumps(variables, separators=(",", ":")).encode()) > TEMPLATE_VARIABLES_MAX_BYTES:
        return f"Variables are limited to {TEMPLATE_VARIABLES_MAX_BYTES} bytes of JSON."
    return None


def send_at_problem(attrs: dict[str, Any]) -> str | None:
    """Why a scheduled send's send_at cannot be taken, or None (the serializer and the batch's
    fast path alike: their errors must be the same)."""
    send_at = attrs["send_at"]
    now = timezone.now()
    if attrs.get("ordering_key"):
        # Its sequence number is taken at acceptance: the later messages with the key would wait
        # behind it until send_at, or overtake it; neither is what an ordering key promises.
        return "A scheduled message cannot have an ordering_key: send it when due instead."
    past = messaging_setting("SEND_AT_PAST_TOLERANCE_SECONDS")
    if send_at < now - timedelta(seconds=past):
        return f"This time is more than {past:g} seconds in the past."
    horizon = messaging_setting("TTL_MAX_SECONDS")
    if send_at > now + timedelta(seconds=horizon):
        return f"Schedule at most {horizon} seconds (TTL_MAX_SECONDS) ahead."
    if attrs.get("expires_at") and send_at >= attrs["expires_at"]:
        return "Give a send_at before expires_at: no horizon beyond the deadline."
    return None


def unstorable_json_text(value: Any) -> str | None:
    """Why PostgreSQL's jsonb would refuse this JSON (a NUL or an unpaired surrogate in a key or a
    string), or None. Iterative: the parser bounds the depth, this must not recurse either."""
    pending = [value]
    while pending:
        node = pending.pop()
        if type(node) is dict:
            for key, item in node.items():
                if not _is_storable_text(key):
                    return f"The key {_shown(key)} holds a NUL character or an unpaired surrogate."
                pending.append(item)
        elif type(node) is list:
            pending.extend(node)
        elif type(node) is str and not _is_storable_text(node):
            return f"The text {_shown(node)} holds a NUL character or an unpaired surrogate."
    return None


def _shown(text: str) -> str:
    return ascii(text[:40])


# MessageCreateSerializer costs ~0.5 ms an item (DRF deep-copies its fields for every instance),
# most of a batch's time. The common item (strings, a ttl, metadata) is checked directly below;
# an item it does not accept whole goes to the serializer, so every error still comes from there.
# A template message (template, variables, perhaps no body) is not among them: the serializer
# checks it (docs/whatsapp.md), a few per batch at most.
_FAST_FIELDS = frozenset(
    {"channel", "to", "body", "priority", "ttl_seconds", "metadata", "send_at"}
    | {"subject", "category", "idempotency_key", "ordering_key"}  # _FAST_TEXT
    | {"callback_url", "callback_events", "timezone"}
)
_CALLBACK_EVENTS = frozenset(CallbackEvent.values)
_CHANNELS = frozenset(Channel.values)
_PRIORITIES = frozenset(Priority.values)
_DECLARED = MessageCreateSerializer._declared_fields
# Trimmed text fields other than `to`: (max_length, allow_blank) as declared on the serializer.
_FAST_TEXT = {
    name: (_DECLARED[name].max_length, _DECLARED[name].allow_blank)
    for name in ("subject", "category", "idempotency_key", "ordering_key")
}
_TTL_MAX = _DECLARED["ttl_seconds"].max_value


def message_create_validate(data: Any) -> tuple[dict[str, Any], None] | tuple[None, dict[str, Any]]:
    """(validated fields, None) or (None, errors), exactly as MessageCreateSerializer gives them."""
    fields = _fast_validated(data)
    if fields is not None:
        return fields, None
    serializer = MessageCreateSerializer(data=data)
    if serializer.is_valid():
        return dict(serializer.validated_data), None
    return None, serializer.errors


def _fast_validated(data: Any) -> dict[str, Any] | None:
    """The serializer's validated data for an item it would accept, or None when unsure."""
    if type(data) is not dict or not _FAST_FIELDS.issuperset(data):
        return None
    channel, body = data.get("channel"), data.get("body")
    if type(channel) is not str or channel not in _CHANNELS or not messaging_setting("ROUTES").get(channel):
        return None
    if type(body) is not str or not body or not _is_storable_text(body):
        return None
    if len(body) > messaging_setting("BODY_MAX_LENGTH")[channel]:
        return None
    to = _fast_text(data.get("to"), _DECLARED["to"].max_length, allow_blank=False)
    if to is None:
        return None
    try:
        to = normalize_recipient(channel, to)
    except serializers.ValidationError:
        return None
    fields: dict[str, Any] = {"channel": channel, "to": to, "body": body}
    if "priority" in data:
        if type(data["priority"]) is not str or data["priority"] not in _PRIORITIES:
            return None
        fields["priority"] = data["priority"]
    else:
        fields["priority"] = Priority.TRANSACTIONAL  # the serializer's default: the enum member itself
    for name, (max_length, allow_blank) in _FAST_TEXT.items():
        if name in data:
            value = _fast_text(data[name], max_length, allow_blank=allow_blank)
            if value is None or (_HAS_CONTROL_BUT_TAB if name == "subject" else _HAS_CONTROL).search(value):
                return None
            fields[name] = value
    if "ttl_seconds" in data:
        ttl = data["ttl_seconds"]
        if type(ttl) is not int or ttl < 1 or ttl > _TTL_MAX:
            return None
        fields["ttl_seconds"] = ttl
    if "metadata" in data:
        if type(data["metadata"]) is not dict:
            return None
        metadata = {str(key): value for key, value in data["metadata"].items()}
        if unstorable_json_text(metadata) is not None or len(json.dumps(metadata)) > messaging_setting(
            "METADATA_MAX_BYTES"
        ):
            return None
        fields["metadata"] = metadata
    if "timezone" in data:
        name = _fast_text(data["timezone"], _DECLARED["timezone"].max_length, allow_blank=True)
        if name is None or (name and name not in valid_time_zone_names()):
            return None
        fields["timezone"] = name
    if "callback_url" in data:
        url = _fast_text(data["callback_url"], CALLBACK_URL_MAX_LENGTH, allow_blank=False)
        if url is None or callback_url_problem(url) is not None:
            return None
        fields["callback_url"] = url
    if "callback_events" in data:
        events = data["callback_events"]
        if "callback_url" not in fields or type(events) is not list or not events:
            return None
        if not all(type(event) is str and event in _CALLBACK_EVENTS for event in events):
            return None
        fields["callback_events"] = list(dict.fromkeys(events))
    if "send_at" in data:
        if type(data["send_at"]) is not str:
            return None
        try:
            # The declared field itself: the same parse and time zone as the serializer's, so the
            # same value (and request fingerprint) whichever path an item takes.
            fields["send_at"] = _DECLARED["send_at"].to_internal_value(data["send_at"])
        except serializers.ValidationError:
            return None
        if send_at_problem(fields) is not None:
            return None
    fields["fallback_to"] = {}  # MessageCreateSerializer._validate_fallback always sets it
    return fields


def _fast_text(value: Any, max_length: int, *, allow_blank: bool) -> str | None:
    """A DRF CharField's value (trimmed), or None for anything but a clean string within bounds."""
    if type(value) is not str or not _is_storable_text(value):
        return None
    value = value.strip()
    if (not value and not allow_blank) or len(value) > max_length:
        return None
    return value


def _is_storable_text(value: str) -> bool:
    """No NUL and no lone surrogate: DRF's CharField refuses both (its check loops per character)."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class BatchSerializer(StrictSerializer):
    # Any JSON per item, null included: each item is checked on its own (a bad one is its own 400).
    messages = serializers.ListField(
        child=serializers.JSONField(allow_null=True),
        allow_empty=False,
        min_length=1,  # as allow_empty, for the schema
        max_length=messaging_setting("BATCH_MAX_ITEMS"),
        error_messages={"max_length": "A batch holds at most {max_length} messages."},
        help_text="1 to BATCH_MAX_ITEMS (1,000) messages, each as for POST /api/v1/messages/.",
    )

    def validate_messages(self, items):
        limit = messaging_setting("BATCH_MAX_ITEMS")
        if len(items) > limit:
            raise serializers.ValidationError(f"A batch holds at most {limit} messages; this one has {len(items)}.")
        return items


class BatchItemResultSerializer(serializers.Serializer):
    index = serializers.IntegerField(help_text="The item's position in the request's messages.")
    status = serializers.IntegerField(
        help_text="As for a single POST: 201 accepted, 200 replayed, 400 bad input, 409 key in flight, "
        "422 key reused with another payload, 503 database unavailable."
    )
    message = serializers.DictField(required=False, help_text="With 200 and 201: the message.")
    errors = serializers.DictField(required=False, help_text="With 4xx and 503: what is wrong, per field.")


class BatchResultSerializer(serializers.Serializer):
    created = serializers.IntegerField()
    replayed = serializers.IntegerField()
    failed = serializers.IntegerField()
    results = BatchItemResultSerializer(many=True, help_text="One per item, in the request's order.")


class AttemptSerializer(serializers.ModelSerializer):
    class Meta:
        model = DispatchAttempt
        fields = list(ATTEMPT_FIELDS)  # the same record a dead letter keeps


class EventSerializer(serializers.ModelSerializer):
    class Meta:
        model = MessageEvent
        fields = ["created_at", "source", "from_state", "to_state", "applied", "detail"]


class ReceiptSerializer(serializers.ModelSerializer):
    """What a client sees of a receipt: these fields only, never the provider's raw payload (it holds
    the provider's account details and, before they were stripped, signatures); operators see the
    payload in the admin."""

    class Meta:
        model = Receipt
        fields = [
            "received_at",
            "provider",
            "provider_message_id",
            "provider_status",
            "mapped_state",
            "error_code",
            "applied",
            "source",
        ]
        extra_kwargs = {
            "received_at": {"help_text": "When Conductor received (or, for a poll, looked up) this status."},
            "provider": {"help_text": "The provider that reported it, e.g. twilio, vonage, mailgun."},
            "provider_message_id": {
                "help_text": "The provider's id of the message (Twilio SID, Vonage message id, Mailgun Message-Id)."
            },
            "provider_status": {
                "help_text": "The status in the provider's words, e.g. delivered, undelivered, opened."
            },
            "mapped_state": {"help_text": "The message state it means (empty: it says nothing about delivery)."},
            "error_code": {"help_text": "The provider's error code, if it gave one."},
            "applied": {"help_text": "Whether it moved the message's state (a late or repeated one does not)."},
            "source": {"help_text": "How it came: webhook (the provider's callback) or poll (a status look-up)."},
        }


class MessageSerializer(serializers.ModelSerializer):
    last_error = serializers.SerializerMethodField()
    timezone = serializers.CharField(
        source="recipient_timezone",
        read_only=True,
        help_text="The recipient's time zone as given (empty: from the number) for quiet hours.",
    )
    send_at = serializers.DateTimeField(
        read_only=True,
        allow_null=True,
        help_text="A scheduled send: when the client asked it sent; it is not sent before (null: at once).",
    )
    waiting_for = serializers.SerializerMethodField(
        help_text="While held back by an earlier message with the same ordering_key: its id."
    )
    variables = serializers.JSONField(
        source="template_variables", read_only=True, help_text="The template's variables ({} without one)."
    )

    class Meta:
        model = Message
        fields = [
            "id",
            "channel",
            "to",
            "subject",
            "body",
            "template",
            "variables",
            "priority",
            "category",
            "idempotency_key",
            "ordering_key",
            "sequence",
            "ordering_mode",
            "waiting_for",
            "waiting_since",
            "state",
            "expires_at",
            "timezone",
            "send_at",
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
            # Fallback on silence (messaging.silence): when a second copy was sent through the route's
            # next provider or channel (null: never); the recipient may have both.
            "silence_fallback_at",
        ]

    def get_waiting_for(self, message: Message) -> str | None:
        if message.state != MessageState.ACCEPTED or message.waiting_for_id is None:
            return None
        return str(message.waiting_for_id)

    def get_last_error(self, message: Message) -> dict[str, str] | None:
        if not message.last_error_type:
            return None
        return {"type": message.last_error_type, "code": message.last_error_code, "message": message.last_error_message}


def message_renderer() -> Callable[[Message], dict[str, Any]]:
    """A function giving MessageSerializer(message).data (as a dict) for any number of messages.

    A serializer per message costs ~1 ms here (its fields are deep-copied each time), more than
    accepting the message; this reads the serializer's fields once and converts each value as
    that field would. A field type without a known conversion fails here, not silently.
    """
    serializer = MessageSerializer()
    # One request, one timezone: DRF looks it up again for every datetime it renders.
    tz = timezone.get_current_timezone() if settings.USE_TZ else None
    plan: list[tuple[str, str | None, Callable[[Any], Any]]] = []
    for name, field in serializer.fields.items():
        if type(field) is serializers.SerializerMethodField:
            plan.append((name, None, getattr(serializer, field.method_name)))
            continue
        if len(field.source_attrs) != 1:
            raise TypeError(f"MessageSerializer.{name}: a dotted source has no fast representation")
        plan.append((name, field.source, _fast_representation(name, field, tz)))

    def render(message: Message) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, source, convert in plan:
            if source is None:
                data[name] = convert(message)
            else:
                value = getattr(message, source)
                data[name] = None if value is None else convert(value)
        return data

    return render


def _fast_representation(name: str, field: serializers.Field, tz: tzinfo | None) -> Callable[[Any], Any]:
    kind = type(field)
    if kind is serializers.CharField or (kind is serializers.UUIDField and field.uuid_format == "hex_verbose"):
        return str
    if kind is serializers.IntegerField:
        return int
    if kind is serializers.JSONField and not field.binary:
        return _unchanged
    if kind is serializers.DateTimeField:
        return _fast_datetime(field, tz)
    if kind in (serializers.BigIntegerField, serializers.ChoiceField):
        return field.to_representation  # cheap on a field built once
    raise TypeError(f"MessageSerializer.{name}: no fast representation for {kind.__name__}")


def _unchanged(value: Any) -> Any:
    return value


def _fast_datetime(field: serializers.DateTimeField, tz: tzinfo | None) -> Callable[[Any], Any]:
    """DRF's ISO 8601 output ('Z' for UTC) in the request's timezone; anything unusual goes to DRF."""
    output_format = getattr(field, "format", api_settings.DATETIME_FORMAT)
    if tz is None or hasattr(field, "timezone") or not output_format or output_format.lower() != ISO_8601:
        return field.to_representation

    def convert(value: Any) -> Any:
        if type(value) is not datetime or value.utcoffset() is None:
            return field.to_representation(value)
        text = value.astimezone(tz).isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text

    return convert


class CallbackAttemptSerializer(serializers.Serializer):
    at = serializers.DateTimeField(required=False, help_text="When the request was sent.")
    status = serializers.IntegerField(
        required=False, allow_null=True, help_text="The endpoint's HTTP status; null: no answer."
    )
    error = serializers.CharField(required=False, allow_blank=True, help_text="What went wrong, if anything.")
    latency_ms = serializers.FloatField(required=False, allow_null=True)


class MessageCallbackSerializer(serializers.ModelSerializer):
    """A status callback of the message to one of the client's endpoints, with its attempts."""

    endpoint_id = serializers.IntegerField(read_only=True)
    endpoint_url = serializers.CharField(source="endpoint.url", read_only=True)
    attempt_log = CallbackAttemptSerializer(many=True, read_only=True)

    class Meta:
        model = Callback
        fields = [
            "webhook_id",
            "event",
            "sequence",
            "occurred_at",
            "endpoint_id",
            "endpoint_url",
            "state",
            "attempts",
            "attempt_log",
            "next_attempt_at",
            "delivered_at",
            "dead_lettered_at",
            "last_error",
        ]
        extra_kwargs = {
            "webhook_id": {"help_text": "The webhook-id header: the same on every retry (de-duplicate on it)."},
            "sequence": {"help_text": "The message's event number: callbacks are sent in this order."},
            "attempts": {"help_text": "Attempts since it was written (or replayed)."},
        }


class MessageDetailSerializer(MessageSerializer):
    attempts = AttemptSerializer(many=True, read_only=True)
    events = EventSerializer(many=True, read_only=True)
    receipts = ReceiptSerializer(many=True, read_only=True)
    callbacks = MessageCallbackSerializer(many=True, read_only=True)

    class Meta(MessageSerializer.Meta):
        fields = MessageSerializer.Meta.fields + ["attempts", "events", "receipts", "callbacks"]


# --- dead letters ---------------------------------------------------------------------------------
class DeadLetterFilterSerializer(serializers.Serializer):
    """The filters of GET /dead-letters/ (query string) and of a replay (JSON body)."""

    state = serializers.ChoiceField(choices=DEAD_LETTER_STATE_CHOICES, required=False)
    channel = serializers.ChoiceField(choices=Channel.choices, required=False)
    priority = serializers.ChoiceField(choices=Priority.choices, required=False)
    category = serializers.CharField(required=False, max_length=100)
    error_type = serializers.ChoiceField(choices=ErrorType.choices, required=False)
    provider = serializers.CharField(required=False, max_length=32)
    created_after = serializers.DateTimeField(required=False, help_text="Parked at or after this time.")
    created_before = serializers.DateTimeField(required=False, help_text="Parked before this time.")
    kind = serializers.ChoiceField(
        choices=DeadLetterKind.choices,
        required=False,
        help_text="message: messages given up on; callback: status callbacks to your endpoints given up on.",
    )
    endpoint = serializers.IntegerField(
        required=False, min_value=1, max_value=BIGINT_MAX, help_text="Callback dead letters of this endpoint."
    )


def dead_letter_criteria(data: dict[str, Any], *, client: ApiClient | None, parked: bool | None) -> DeadLetterCriteria:
    """The selector's criteria from validated filter fields (single values in the API)."""

    def one(name: str) -> tuple[str, ...]:
        return (data[name],) if name in data else ()

    return DeadLetterCriteria(
        client=client,
        since=data.get("created_after"),
        until=data.get("created_before"),
        channels=one("channel"),
        providers=one("provider"),
        error_types=one("error_type"),
        categories=one("category"),
        priorities=one("priority"),
        states=one("state"),
        ids=tuple(data.get("ids", ())),
        kinds=one("kind"),
        endpoints=(data["endpoint"],) if "endpoint" in data else (),
        parked=parked,
    )


class DeadLetterListQuerySerializer(DeadLetterFilterSerializer):
    status = serializers.ChoiceField(choices=["parked", "replayed"], required=False)


class DeadLetterReplaySerializer(StrictSerializer, DeadLetterFilterSerializer):
    ids = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        max_length=1000,
        help_text="Dead-letter ids (numbers) or message ids (UUIDs).",
    )
    all = serializers.BooleanField(
        default=False, help_text="Replay every parked dead letter; needed when no filter is given."
    )
    limit = serializers.IntegerField(required=False, min_value=1, help_text="At most this many, oldest first.")
    dry_run = serializers.BooleanField(default=False, help_text="Count what would be replayed; change nothing.")
    force = serializers.BooleanField(
        default=False, help_text="Replay even past a kept deadline or when a receipt says it arrived."
    )

    def validate_ids(self, values: list[str]) -> list[int | uuid.UUID]:
        try:
            return [parse_dead_letter_id(value) for value in values]
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_limit(self, value: int) -> int:
        cap = messaging_setting("REPLAY_API_MAX_ITEMS")
        if value > cap:
            raise serializers.ValidationError(f"At most {cap} per call; call again for the rest.")
        return value

    def validate(self, attrs):
        if not dead_letter_criteria(attrs, client=None, parked=True).narrows() and not attrs["all"]:
            raise serializers.ValidationError(
                {"all": ["Give at least one filter (or ids), or set all to true to replay every dead letter."]}
            )
        return attrs


def parse_dead_letter_id(value: str) -> int | uuid.UUID:
    """A dead-letter id is a number, a message id a UUID: either names a dead letter."""
    value = str(value).strip()
    if value.isascii() and value.isdigit():
        if int(value) > BIGINT_MAX:  # not an id PostgreSQL could hold: not a dead letter's
            raise ValueError(f"{value[:40]!r} is larger than any dead-letter id.")
        return int(value)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a dead-letter id (a number) nor a message id (a UUID).") from None


class DeadLetterCallbackSerializer(serializers.ModelSerializer):
    endpoint_id = serializers.IntegerField(read_only=True)
    endpoint_url = serializers.CharField(source="endpoint.url", read_only=True)

    class Meta:
        model = Callback
        fields = ["id", "webhook_id", "event", "sequence", "endpoint_id", "endpoint_url", "state"]


class DeadLetterSerializer(serializers.ModelSerializer):
    message_id = serializers.UUIDField(read_only=True)
    status = serializers.SerializerMethodField()
    error = serializers.SerializerMethodField()
    callback = DeadLetterCallbackSerializer(
        read_only=True, allow_null=True, help_text="Of kind callback: the callback given up on; else null."
    )

    class Meta:
        model = DeadLetter
        fields = [
            "id",
            "kind",
            "message_id",
            "callback",
            "status",
            "state",
            "channel",
            "priority",
            "category",
            "provider",
            "send_generation",
            "error",
            "reason",
            "unknown_outcome",
            "created_at",
            "replayed_at",
            "replayed_by",
            "replayed_via",
            "replay_id",
        ]

    def get_status(self, dead_letter: DeadLetter) -> str:
        return "parked" if dead_letter.is_parked else "replayed"

    def get_error(self, dead_letter: DeadLetter) -> dict[str, str]:
        return {"type": dead_letter.error_type, "code": dead_letter.error_code, "message": dead_letter.error_message}


class DeadLetterDetailSerializer(DeadLetterSerializer):
    class Meta(DeadLetterSerializer.Meta):
        fields = DeadLetterSerializer.Meta.fields + ["payload", "attempts"]


class ReplayResultSerializer(serializers.Serializer):
    replay_id = serializers.UUIDField()
    dry_run = serializers.BooleanField()
    matched = serializers.IntegerField(help_text="Parked dead letters matching the filter.")
    selected = serializers.IntegerField(help_text="Of those, how many this call handled (limit).")
    replayed = serializers.IntegerField(help_text="Replayed, or with dry_run, would be.")
    replayed_by_kind = serializers.DictField(
        child=serializers.IntegerField(), help_text="Of those, per kind: message and callback."
    )
    skipped = serializers.DictField(child=serializers.IntegerField())
    remaining = serializers.IntegerField(help_text="Matching parked dead letters left for another call.")
    dead_letter_ids = serializers.ListField(child=serializers.IntegerField(), help_text="Every one handled.")
    message_ids = serializers.ListField(child=serializers.UUIDField(), help_text="The messages replayed.")
    callback_ids = serializers.ListField(child=serializers.IntegerField(), help_text="The callbacks replayed.")
