"""The admin's provider routes (condition, weight, reason: saved through provider_route_set, never a
raw save) and the read-only log of routing changes. Registered by messaging.admin."""

from __future__ import annotations

from django import forms
from django.contrib import admin

from messaging.models import ProviderRoute, RouteCondition, RoutingChange
from messaging.route_operations import (
    REASON_MAX_LENGTH,
    WEIGHT_MAX,
    RouteInputError,
    route_change_by_operator,
    route_country_valid,
)
from messaging.routing import routed_providers


class ProviderRouteForm(forms.ModelForm):
    """A route change by an operator: the reason is asked every time (the model's is the last one)."""

    provider = forms.ChoiceField(choices=())
    country = forms.CharField(
        max_length=2, required=False, help_text="ISO 3166-1 alpha-2 (US, GB); blank: every country."
    )
    weight = forms.IntegerField(
        min_value=0,
        max_value=WEIGHT_MAX,
        required=False,
        help_text="Share of the channel's first place among providers with a weight; blank: route order.",
    )
    change_reason = forms.CharField(
        label="Reason",
        max_length=REASON_MAX_LENGTH,
        help_text="Why this change (kept with it, shown on the dashboard).",
    )

    class Meta:
        model = ProviderRoute
        fields = ["provider", "country", "condition", "weight"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["provider"].choices = [(name, name) for name in sorted(routed_providers())]
        self.fields[
            "condition"
        ].help_text = "degraded: behind the healthy providers but for a probe share; drained: last resort only."
        if self.instance.pk:  # which route a row is stays; its condition and weight change
            for name in ("provider", "country"):
                self.fields[name].disabled = True

    def clean_country(self) -> str:
        try:
            return route_country_valid(self.cleaned_data.get("country", ""))
        except RouteInputError as exc:
            raise forms.ValidationError(exc.message) from None

    def validate_unique(self) -> None:
        """Adding a row that exists changes that row (provider_route_set upserts)."""


@admin.register(ProviderRoute)
class ProviderRouteAdmin(admin.ModelAdmin):
    """Each provider's condition and weight, per country or for all (no row: healthy, route order).
    Saving records a RoutingChange with source operator:<username>; rows are not deleted (set
    healthy and no weight instead: the log keeps who did it)."""

    form = ProviderRouteForm
    list_display = ["provider", "country_or_all", "condition", "weight", "source", "reason", "changed_at"]
    list_filter = ["condition", "provider", "country"]
    readonly_fields = ["reason", "source", "changed_at"]
    fields = ["provider", "country", "condition", "weight", "change_reason", "reason", "source", "changed_at"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="country", ordering="country")
    def country_or_all(self, route: ProviderRoute) -> str:
        return route.country or "all"

    def save_model(self, request, obj, form, change) -> None:
        data = form.cleaned_data
        provider = obj.provider if change else data["provider"]
        country = obj.country if change else data.get("country", "")
        try:
            route_change_by_operator(
                provider=provider,
                country=country,
                condition=data.get("condition") or RouteCondition.HEALTHY,
                weight=data.get("weight"),
                reason=data["change_reason"],
                operator=request.user.get_username(),
            )
        except RouteInputError as exc:  # the form checked the same; a provider gone from ROUTES since
            self.message_user(request, f"{exc.field}: {exc.message}", level="error")
            return
        saved = ProviderRoute.objects.filter(provider=provider, country=country).first()
        if saved is not None:
            obj.pk = saved.pk  # the admin's redirect and log name this row


@admin.register(RoutingChange)
class RoutingChangeAdmin(admin.ModelAdmin):
    """Every change of routing, who made it (detector, operator:<name>, drill:<id>) and why."""

    list_display = [
        "created_at",
        "provider",
        "country",
        "from_condition",
        "to_condition",
        "weights",
        "source",
        "reason",
    ]
    list_filter = ["to_condition", "provider", "country", "source"]
    search_fields = ["provider", "source", "reason"]
    date_hierarchy = "created_at"
    ordering = ["-created_at", "-pk"]

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in self.model._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="weight")
    def weights(self, change: RoutingChange) -> str:
        return "" if change.from_weight == change.to_weight else f"{change.from_weight} → {change.to_weight}"
