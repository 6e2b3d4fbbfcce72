"""Staff-only admin: messages with their timelines, dead letters to inspect and replay, clients and keys,
clients' callback endpoints and the callbacks sent to them, clients' suppression lists.

Everything is read-only: state changes go through the services (cancel, replay, enable, disable,
rotate), never row edits.
"""

from __future__ import annotations

import json

from django import forms
from django.contrib import admin
from django.contrib import messages as flash
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from messaging import admin_routes  # noqa: F401  (registers provider routes and routing changes)
from messaging.callbacks.endpoints import (
    callback_endpoint_disable,
    callback_endpoint_enable,
    callback_endpoint_rotate_secret,
    secrets_active,
)
from messaging.dead_letters import ATTEMPT_FIELDS
from messaging.logging import masked
from messaging.models import (
    ApiClient,
    ApiKey,
    Callback,
    CallbackEndpoint,
    DeadLetter,
    DeadLetterKind,
    DispatchAttempt,
    EventSource,
    InboundMessage,
    Message,
    MessageEvent,
    Receipt,
    Suppression,
    WhatsAppSession,
    scheduled_waiting,
)
from messaging.replay import SkipReason, dead_letters_replay
from messaging.routing import Priority
from messaging.services import NotCancellable, message_cancel
from messaging.states import MessageState
from messaging.suppressions.files import address_normalized
from messaging.suppressions.selectors import suppression_address
from messaging.suppressions.services import suppression_add, suppression_lift

REPLAY_PERMISSION = "messaging.replay_deadletter"


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """For rows only the services write (dead letters, receipts, runs, alerts): look, never edit."""

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields or [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class AttemptInline(ReadOnlyInline):
    model = DispatchAttempt
    fields = [name for name in ATTEMPT_FIELDS if name != "error_message"]
    readonly_fields = fields


class EventInline(ReadOnlyInline):
    model = MessageEvent
    fields = ["created_at", "source", "from_state", "to_state", "applied", "detail"]
    readonly_fields = fields


class ReceiptInline(ReadOnlyInline):
    model = Receipt
    fields = ["received_at", "provider", "provider_status", "mapped_state", "error_code", "applied", "source"]
    readonly_fields = fields


class CallbackInline(ReadOnlyInline):
    model = Callback
    fields = ["event", "sequence", "endpoint", "state", "attempts", "last_error", "delivered_at", "webhook_id"]
    readonly_fields = fields
    ordering = ["sequence", "endpoint"]


class DeadLetterInline(ReadOnlyInline):
    model = DeadLetter
    fields = ["link", "kind", "send_generation", "state", "error_type", "created_at", "replayed_at", "replayed_by"]
    readonly_fields = fields

    @admin.display(description="dead letter")
    def link(self, dead_letter: DeadLetter) -> str:
        url = reverse("admin:messaging_deadletter_change", args=[dead_letter.pk])
        return format_html('<a href="{}">#{}</a>', url, dead_letter.pk)


def _replay(modeladmin: admin.ModelAdmin, request: HttpRequest, selection: QuerySet[DeadLetter], force: bool) -> None:
    """The admin door to the replay service; tells the user what happened in one line."""
    report = dead_letters_replay(
        selection=selection, actor=request.user.get_username(), via=EventSource.ADMIN, force=force
    )
    skipped = ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(report.skipped.items()))
    hint = ""
    if report.skipped.get(SkipReason.PAST_DEADLINE) or report.skipped.get(SkipReason.ARRIVED):
        hint = " Use the 'even past their deadline' action to send those anyway."
    if report.skipped.get(SkipReason.SUPPRESSED):
        hint += " Suppressed addresses are not replayed: lift their suppression (Suppressions) first."
    modeladmin.message_user(
        request,
        f"Replayed {report.replayed} (replay {report.replay_id})."
        + (f" Skipped: {skipped}." if skipped else "")
        + hint,
        flash.SUCCESS if not report.skipped else flash.WARNING,
    )


class ReplayPermissionMixin:
    def has_replay_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(REPLAY_PERMISSION)


class WaitingFilter(admin.SimpleListFilter):
    """Accepted messages not due yet: scheduled by the client (send_at), or held back (quiet hours,
    a retry's backoff); what an operator asks before a campaign's time comes."""

    title = "waiting"
    parameter_name = "waiting"

    def lookups(self, request, model_admin):
        return [("scheduled", "scheduled (send_at ahead)"), ("held", "held back (quiet hours, backoff)")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "scheduled":  # as the API's ?scheduled=true
            return queryset.filter(scheduled_waiting(now))
        if self.value() == "held":
            held = queryset.filter(state=MessageState.ACCEPTED, next_attempt_at__gt=now)
            return held.exclude(scheduled_waiting(now))
        return queryset


class SilenceFallbackFilter(admin.SimpleListFilter):
    """Messages a fallback on silence sent a second copy of (messaging.silence): the recipient may
    have two."""

    title = "silence fallback"
    parameter_name = "silence_fallback"

    def lookups(self, request, model_admin):
        return [("yes", "second copy sent"), ("no", "none")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(silence_fallback_at__isnull=self.value() == "no")
        return queryset


@admin.register(Message)
class MessageAdmin(ReplayPermissionMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "client",
        "channel",
        "priority",
        "state",
        "provider",
        "category",
        "attempt_count",
        "ordering_position",
        "send_at",
        "created_at",
    ]
    list_filter = [
        *("state", "channel", "priority", "provider", "category", "created_at"),
        *(WaitingFilter, SilenceFallbackFilter),
    ]
    search_fields = ["=id", "=idempotency_key", "=provider_message_id", "=ordering_key"]
    date_hierarchy = "created_at"
    inlines = [AttemptInline, EventInline, ReceiptInline, CallbackInline, DeadLetterInline]
    actions = ["cancel_selected", "replay_selected"]
    list_select_related = ["client"]

    def get_readonly_fields(self, request, obj=None):
        # The state only changes through the transition service, never by editing the row.
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="ordering")
    def ordering_position(self, message: Message) -> str:
        """Key and sequence; "waiting" while an earlier message with the key holds it back."""
        if message.sequence is None:
            return "–"
        waiting = " (waiting)" if message.waiting_for_id and message.state == MessageState.ACCEPTED else ""
        return f"{message.ordering_key} #{message.sequence}{waiting}"

    # A state change: only for staff allowed to change messages (view-only staff do not see it).
    @admin.action(description="Cancel selected messages (only those not yet dispatched)", permissions=["change"])
    def cancel_selected(self, request, queryset) -> None:
        cancelled = refused = 0
        for message in queryset:
            try:
                message_cancel(message=message, source=EventSource.ADMIN, actor=request.user.get_username())
                cancelled += 1
            except NotCancellable:
                refused += 1
        self.message_user(
            request,
            f"Cancelled {cancelled}; {refused} could no longer be cancelled.",
            flash.SUCCESS if not refused else flash.WARNING,
        )

    @admin.action(description="Replay selected messages' dead letters", permissions=["replay"])
    def replay_selected(self, request, queryset) -> None:
        selection = DeadLetter.objects.filter(
            message__in=queryset, kind=DeadLetterKind.MESSAGE, replayed_at__isnull=True
        ).order_by("created_at")
        not_parked = queryset.count() - selection.count()
        if not_parked:
            self.message_user(
                request, f"{not_parked} of the selected messages have no parked dead letter.", flash.WARNING
            )
        _replay(self, request, selection, force=False)


def timestamp_status_filter(field: str, unset: str, set_: str) -> type[admin.SimpleListFilter]:
    """A "status" list filter on whether `field` (a timestamp) is set: replayed, resolved..."""

    class StatusFilter(admin.SimpleListFilter):
        title = "status"
        parameter_name = "status"

        def lookups(self, request, model_admin):
            return [(unset, unset), (set_, set_)]

        def queryset(self, request, queryset):
            if self.value() in (unset, set_):
                return queryset.filter(**{f"{field}__isnull": self.value() == unset})
            return queryset

    return StatusFilter


@admin.register(DeadLetter)
class DeadLetterAdmin(ReplayPermissionMixin, ReadOnlyAdmin):
    """Read-only: dead letters leave by replay or by the retention job, never by hand."""

    list_display = [
        "id",
        "kind",
        "message_link",
        "client",
        "channel",
        "priority",
        "category",
        "provider",
        "error_type",
        "state",
        "created_at",
        "status",
    ]
    list_filter = [
        timestamp_status_filter("replayed_at", "parked", "replayed"),
        "kind",
        "channel",
        "provider",
        "error_type",
        "category",
        "priority",
        "state",
        ("created_at", admin.DateFieldListFilter),
    ]
    search_fields = ["=id", "=message__id", "=message__idempotency_key", "=message__provider_message_id"]
    date_hierarchy = "created_at"
    list_select_related = ["client"]
    actions = ["replay_selected", "replay_selected_forced"]
    fields = [
        "kind",
        "message_link",
        "callback_link",
        "client",
        "send_generation",
        "state",
        "channel",
        "priority",
        "category",
        "provider",
        "error_type",
        "error_code",
        "error_message",
        "reason",
        "unknown_outcome",
        "created_at",
        "replayed_at",
        "replayed_by",
        "replayed_via",
        "replay_id",
        "payload_pretty",
        "attempts_table",
    ]
    readonly_fields = fields

    @admin.display(description="message", ordering="message")
    def message_link(self, dead_letter: DeadLetter) -> str:
        url = reverse("admin:messaging_message_change", args=[dead_letter.message_id])
        return format_html('<a href="{}">{}</a>', url, dead_letter.message_id)

    @admin.display(description="callback")
    def callback_link(self, dead_letter: DeadLetter) -> str:
        if dead_letter.callback_id is None:
            return "–"
        url = reverse("admin:messaging_callback_change", args=[dead_letter.callback_id])
        return format_html('<a href="{}">#{}</a>', url, dead_letter.callback_id)

    @admin.display(description="status")
    def status(self, dead_letter: DeadLetter) -> str:
        if dead_letter.is_parked:
            return "parked"
        return f"replayed by {dead_letter.replayed_by} ({dead_letter.replayed_via})"

    @admin.display(description="payload (the message as accepted, or the callback's body)")
    def payload_pretty(self, dead_letter: DeadLetter) -> str:
        return format_html("<pre>{}</pre>", json.dumps(dead_letter.payload, indent=2, cls=DjangoJSONEncoder))

    @admin.display(description="attempts")
    def attempts_table(self, dead_letter: DeadLetter) -> str:
        if dead_letter.kind == DeadLetterKind.CALLBACK:
            columns = list(CALLBACK_ATTEMPT_FIELDS)
        else:
            columns = [name for name in ATTEMPT_FIELDS if name != "error_message"]
        head = format_html_join("", "<th>{}</th>", ((name.replace("_", " "),) for name in columns))
        rows = format_html_join(
            "",
            "<tr>{}</tr>",
            (
                (format_html_join("", "<td>{}</td>", ((attempt.get(name, ""),) for name in columns)),)
                for attempt in dead_letter.attempts
            ),
        )
        return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, rows)

    @admin.action(description="Replay selected dead letters", permissions=["replay"])
    def replay_selected(self, request, queryset) -> None:
        _replay(self, request, queryset.filter(replayed_at__isnull=True).order_by("created_at", "pk"), force=False)

    @admin.action(description="Replay selected dead letters, even past their deadline", permissions=["replay"])
    def replay_selected_forced(self, request, queryset) -> None:
        _replay(self, request, queryset.filter(replayed_at__isnull=True).order_by("created_at", "pk"), force=True)


CALLBACK_ATTEMPT_FIELDS = ("at", "status", "error", "latency_ms")


def attempt_log_table(attempts: list[dict]) -> str:
    head = format_html_join("", "<th>{}</th>", ((name.replace("_", " "),) for name in CALLBACK_ATTEMPT_FIELDS))
    rows = format_html_join(
        "",
        "<tr>{}</tr>",
        (
            (format_html_join("", "<td>{}</td>", ((attempt.get(name, ""),) for name in CALLBACK_ATTEMPT_FIELDS)),)
            for attempt in attempts
        ),
    )
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, rows)


@admin.register(CallbackEndpoint)
class CallbackEndpointAdmin(ReadOnlyAdmin):
    """Clients' endpoints: changed through the services (the actions here, or the client's API)."""

    list_display = ["id", "client", "url", "enabled", "per_message", "events", "failing_since", "disabled_at"]
    list_filter = ["enabled", "per_message", "client"]
    search_fields = ["url", "=client__name"]
    list_select_related = ["client"]
    actions = ["enable_selected", "disable_selected", "rotate_secret_selected"]
    fields = [
        "client",
        "url",
        "description",
        "events",
        "enabled",
        "per_message",
        "failing_since",
        "disabled_at",
        "disabled_reason",
        "secrets_summary",
        "created_at",
        "updated_at",
    ]
    readonly_fields = fields

    def has_manage_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("messaging.change_callbackendpoint")

    @admin.display(description="secrets")
    def secrets_summary(self, endpoint: CallbackEndpoint) -> str:
        """When each signing secret was made and ends; never the secret (the client reads it by API)."""
        active = secrets_active(endpoint.secrets, now=timezone.now())
        return format_html_join(
            "",
            "<div>{}… created {}, {}</div>",
            (
                (s["secret"][:9], s["created_at"], f"ends {s['expires_at']}" if s["expires_at"] else "current")
                for s in active
            ),
        )

    @admin.action(
        description="Enable selected endpoints (their parked callbacks stay dead letters)", permissions=["manage"]
    )
    def enable_selected(self, request, queryset) -> None:
        enabled = sum(callback_endpoint_enable(endpoint_id=pk) for pk in queryset.values_list("pk", flat=True))
        self.message_user(request, f"Enabled {enabled}. Replay their callback dead letters to send what was parked.")

    @admin.action(
        description="Disable selected endpoints (pending callbacks become dead letters)", permissions=["manage"]
    )
    def disable_selected(self, request, queryset) -> None:
        now = timezone.now()
        reason = f"disabled by {request.user.get_username()} (admin)"
        results = [
            callback_endpoint_disable(endpoint_id=pk, reason=reason, now=now)
            for pk in queryset.values_list("pk", flat=True)
        ]
        done = [parked for parked in results if parked is not None]
        self.message_user(request, f"Disabled {len(done)}; {sum(done)} pending callbacks parked as dead letters.")

    @admin.action(description="Rotate the signing secret of selected endpoints", permissions=["manage"])
    def rotate_secret_selected(self, request, queryset) -> None:
        for pk in queryset.values_list("pk", flat=True):
            callback_endpoint_rotate_secret(endpoint_id=pk)
        self.message_user(
            request,
            f"Rotated {queryset.count()}: the old secrets sign beside the new ones for the overlap "
            "(CALLBACK_SECRET_OVERLAP_SECONDS); clients read the new one at /api/v1/callback-endpoints/<id>/secret/.",
        )


@admin.register(Callback)
class CallbackAdmin(ReadOnlyAdmin):
    """The outbox of status callbacks: look, never edit (dead ones are replayed from the dead letters)."""

    list_display = [
        "webhook_id",
        "message_link",
        "endpoint",
        "event",
        "sequence",
        "state",
        "attempts",
        "next_attempt_at",
        "created_at",
        "delivered_at",
    ]
    list_filter = ["state", "event", "endpoint"]
    search_fields = ["=webhook_id", "=message__id"]
    list_select_related = ["endpoint__client"]
    fields = [
        "webhook_id",
        "message_link",
        "endpoint",
        "event",
        "sequence",
        "occurred_at",
        "state",
        "attempts",
        "next_attempt_at",
        "lease_expires_at",
        "created_at",
        "retry_from",
        "delivered_at",
        "dead_lettered_at",
        "last_error",
        "payload_pretty",
        "attempt_log_table",
    ]
    readonly_fields = fields

    @admin.display(description="message", ordering="message")
    def message_link(self, callback: Callback) -> str:
        url = reverse("admin:messaging_message_change", args=[callback.message_id])
        return format_html('<a href="{}">{}</a>', url, callback.message_id)

    @admin.display(description="body")
    def payload_pretty(self, callback: Callback) -> str:
        return format_html("<pre>{}</pre>", json.dumps(callback.payload, indent=2, cls=DjangoJSONEncoder))

    @admin.display(description="attempts")
    def attempt_log_table(self, callback: Callback) -> str:
        return attempt_log_table(callback.attempt_log)


class ApiKeyInline(admin.TabularInline):
    model = ApiKey
    extra = 0
    fields = ["prefix", "is_active", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "created_at", "last_used_at"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # keys are created by `manage.py create_api_key` so the raw key is shown once


class ApiClientForm(forms.ModelForm):
    """Priorities as checkboxes (none ticked: the ALLOWED_PRIORITIES setting)."""

    allowed_priorities = forms.MultipleChoiceField(
        choices=Priority.choices,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        help_text=ApiClient._meta.get_field("allowed_priorities").help_text,
    )

    class Meta:
        model = ApiClient
        fields = "__all__"


@admin.register(ApiClient)
class ApiClientAdmin(admin.ModelAdmin):
    form = ApiClientForm
    list_display = ["name", "api_rate", "sms_daily_quota", "whatsapp_daily_quota", "email_daily_quota", "created_at"]
    fieldsets = [
        (None, {"fields": ["name"]}),
        (
            "Limits (blank: the settings' defaults)",
            {
                "fields": [
                    "api_rate",
                    ("sms_daily_quota", "whatsapp_daily_quota", "email_daily_quota"),
                    "allowed_priorities",
                ]
            },
        ),
        ("Opt-outs", {"fields": ["opt_out_exempt_categories"]}),
        ("Quiet hours (blank: the QUIET_HOURS setting; docs/quiet-hours.md)", {"fields": ["quiet_hours"]}),
    ]
    inlines = [ApiKeyInline]


class SuppressionAddForm(forms.ModelForm):
    """A suppression added by an operator (stored through suppression_add: the address normalized)."""

    class Meta:
        model = Suppression
        fields = ["client", "channel", "address", "scope", "reason", "note"]

    def clean(self):
        cleaned = super().clean()
        if cleaned.get("channel") and cleaned.get("address"):
            try:
                cleaned["address"] = address_normalized(cleaned["channel"], cleaned["address"])
            except ValueError as exc:
                self.add_error("address", str(exc))
        return cleaned

    def validate_constraints(self, exclude=None) -> None:
        """An active duplicate is not an error: suppression_add returns the existing one."""


class SuppressionActiveFilter(admin.SimpleListFilter):
    title = "active"
    parameter_name = "active"

    def lookups(self, request, model_admin):
        return [("yes", "Active"), ("no", "Lifted")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(lifted_at__isnull=self.value() == "yes")
        return queryset


@admin.register(Suppression)
class SuppressionAdmin(ReadOnlyAdmin):
    """Clients' suppression lists. Addresses are personal data: masked in the list, whole on the
    row's page. Search by an exact address (any form: +1 415 555 2671, Ada@Example.com) or client
    name. Lifting keeps the row, with who and why; rows are never edited or deleted here."""

    list_display = ["id", "client", "channel", "masked_address", "scope", "reason", "active", "source", "created_at"]
    list_filter = ["channel", "reason", SuppressionActiveFilter, "client"]
    list_select_related = ["client"]
    search_fields = ["=client__name"]
    search_help_text = "An exact address (any form) or a client's name."
    actions = ["lift_selected"]
    fields = [
        "client",
        "channel",
        "address",
        "scope",
        "reason",
        "covers_exempt",
        "source",
        "note",
        "created_at",
        "lifted_at",
        "lifted_reason",
        "lifted_by",
    ]
    readonly_fields = fields

    def has_add_permission(self, request) -> bool:
        return request.user.has_perm("messaging.add_suppression")

    def has_lift_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("messaging.change_suppression")

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = SuppressionAddForm
        return super().get_form(request, obj, change=change, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields if obj is not None else []

    def get_fields(self, request, obj=None):
        return self.fields if obj is not None else SuppressionAddForm.Meta.fields

    def save_model(self, request, obj, form, change) -> None:
        data = form.cleaned_data
        suppression, _ = suppression_add(
            client=data["client"],
            channel=data["channel"],
            address=data["address"],
            reason=data["reason"],
            scope=data.get("scope", ""),
            note=data.get("note", ""),
            source=f"admin {request.user.get_username()}",
        )
        obj.pk = suppression.pk  # the admin's redirect and log name this row (new or already there)

    def get_search_results(self, request, queryset, search_term):
        """An address in any form matches its stored form; else the client's name."""
        term = search_term.strip()
        if not term:
            return queryset, False
        forms_of_it = {suppression_address("sms", term), suppression_address("email", term)}
        by_address = queryset.filter(address__in=sorted(forms_of_it))
        by_client = queryset.filter(client__name=term)
        return by_address | by_client, False

    @admin.display(description="address")
    def masked_address(self, suppression: Suppression) -> str:
        return masked(suppression.address)

    @admin.display(description="active", boolean=True)
    def active(self, suppression: Suppression) -> bool:
        return suppression.active

    @admin.action(description="Lift selected suppressions (messages to them go out again)", permissions=["lift"])
    def lift_selected(self, request, queryset) -> None:
        user = request.user.get_username()
        lifted = sum(
            suppression_lift(suppression=row, reason=f"lifted in admin by {user}", by=f"admin {user}")
            for row in queryset.filter(lifted_at__isnull=True)
        )
        self.message_user(
            request,
            f"Lifted {lifted}. Replay their dead letters (Dead letters, error type suppressed) to send what "
            "was refused.",
        )


@admin.register(InboundMessage)
class InboundMessageAdmin(ReadOnlyAdmin):
    """Messages recipients sent to our numbers (STOP, START, HELP...) and what Conductor did with
    each: the trail behind a stop_keyword suppression. The sender is masked in the list."""

    list_display = ["id", "received_at", "provider", "channel", "masked_sender", "keyword", "action", "client"]
    list_filter = ["provider", "channel", "action", "client"]
    list_select_related = ["client"]
    search_fields = ["=keyword", "=client__name"]
    date_hierarchy = "received_at"

    @admin.display(description="sender")
    def masked_sender(self, inbound: InboundMessage) -> str:
        return masked(inbound.sender)


@admin.register(WhatsAppSession)
class WhatsAppSessionAdmin(ReadOnlyAdmin):
    """When each WhatsApp recipient last wrote to us: their customer-service window, in which
    free-form messages may go (docs/whatsapp.md). Kept by the inbound webhook, never edited here."""

    list_display = ["masked_address", "last_inbound_at"]
    search_fields = ["=address"]
    date_hierarchy = "last_inbound_at"

    @admin.display(description="address")
    def masked_address(self, session: WhatsAppSession) -> str:
        return masked(session.address)


@admin.register(Receipt)
class ReceiptAdmin(ReadOnlyAdmin):
    list_display = ["received_at", "provider", "provider_status", "mapped_state", "applied", "source", "message"]
    list_filter = ["provider", "provider_status", "applied", "source"]
    search_fields = ["=provider_message_id", "=event_id"]
