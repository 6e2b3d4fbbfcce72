"""The operators' routes endpoint: the providers' routing conditions and changes, and a change by hand.

Not for API clients: a client's key says who sends, not who may move every client's traffic off a
provider. It takes Django staff users, by session (the admin's login, CSRF-checked) or HTTP basic
auth (scripts, over TLS), the same people who can drain a provider in the admin; a change also
needs the messaging.change_providerroute permission (a superuser has it). Every change goes
through provider_route_set with source "operator:<username>" and a reason (docs/routing.md).
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import authentication, permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from messaging.models import RouteCondition
from messaging.route_health import UNSET
from messaging.route_operations import (
    REASON_MAX_LENGTH,
    WEIGHT_MAX,
    RouteInputError,
    route_change_by_operator,
    route_row,
    routes_listed,
    routing_change_row,
    routing_changes_recent,
)

CHANGES_LISTED = 50


class IsRouteOperator(permissions.BasePermission):
    """Staff may look; changing needs the permission to change provider routes."""

    message = "Only Django staff users may see routes (and change them with messaging.change_providerroute)."

    def has_permission(self, request, view) -> bool:
        user = request.user
        if not (user and user.is_authenticated and getattr(user, "is_staff", False)):
            return False
        return request.method in permissions.SAFE_METHODS or user.has_perm("messaging.change_providerroute")


class RouteChangeSerializer(serializers.Serializer):
    provider = serializers.CharField(max_length=32)
    country = serializers.CharField(max_length=2, required=False, allow_blank=True, default="")
    condition = serializers.ChoiceField(choices=RouteCondition.choices, required=False)
    weight = serializers.IntegerField(min_value=0, max_value=WEIGHT_MAX, required=False, allow_null=True)
    reason = serializers.CharField(max_length=REASON_MAX_LENGTH)
    dry_run = serializers.BooleanField(required=False, default=False)


class RoutesView(APIView):
    # Basic first: an unauthenticated call gets 401 with its challenge, not a bare 403.
    authentication_classes = [authentication.BasicAuthentication, authentication.SessionAuthentication]
    permission_classes = [IsRouteOperator]
    throttle_classes: list = []  # the client rate is per API client; operators are few

    @extend_schema(exclude=True)
    def get(self, request: Request) -> Response:
        return Response(
            {
                "routes": [route_row(route) for route in routes_listed()],
                "changes": [routing_change_row(change) for change in routing_changes_recent(limit=CHANGES_LISTED)],
            }
        )

    @extend_schema(exclude=True)
    def post(self, request: Request) -> Response:
        body = RouteChangeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            result = route_change_by_operator(
                provider=data["provider"],
                country=data["country"],
                condition=data.get("condition"),
                weight=data["weight"] if "weight" in data else UNSET,
                reason=data["reason"],
                operator=request.user.get_username(),
                dry_run=data["dry_run"],
            )
        except RouteInputError as exc:
            return Response({exc.field: [exc.message]}, status=status.HTTP_400_BAD_REQUEST)
        return Response(result.as_dict(), status=status.HTTP_200_OK)
