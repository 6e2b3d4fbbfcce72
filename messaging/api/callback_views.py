"""Thin API views of a client's callback endpoints: parse, call one service, shape the response."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.request import Request
from rest_framework.response import Response

from messaging.api.callback_serializers import (
    CallbackEndpointCreatedSerializer,
    CallbackEndpointCreateSerializer,
    CallbackEndpointSecretsSerializer,
    CallbackEndpointSerializer,
    CallbackEndpointUpdateSerializer,
)
from messaging.api.views import NewestFirstPagination
from messaging.callbacks.endpoints import (
    EndpointUrlTaken,
    callback_endpoint_create,
    callback_endpoint_delete,
    callback_endpoint_rotate_secret,
    callback_endpoint_update,
    secrets_active,
)
from messaging.models import CallbackEndpoint
from messaging.selectors import callback_endpoints_for_client


def _secrets(endpoint: CallbackEndpoint) -> dict:
    active = secrets_active(endpoint.secrets, now=timezone.now())
    return {"secret": active[0]["secret"] if active else "", "secrets": active}


class CallbackEndpointListCreateView(generics.ListAPIView):
    """The client's callback endpoints, newest first (those its messages named by callback_url too)."""

    serializer_class = CallbackEndpointSerializer
    pagination_class = NewestFirstPagination
    filter_backends: list = []

    def get_queryset(self):
        return callback_endpoints_for_client(client=self.request.auth)

    @extend_schema(request=CallbackEndpointCreateSerializer, responses={201: CallbackEndpointCreatedSerializer})
    def post(self, request: Request) -> Response:
        """Register an endpoint; the answer holds its signing secret (readable later at .../secret/)."""
        given = CallbackEndpointCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            endpoint, secret = callback_endpoint_create(client=request.auth, **given.validated_data)
        except EndpointUrlTaken as exc:
            return Response({"url": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
        return Response({**CallbackEndpointSerializer(endpoint).data, "secret": secret}, status=status.HTTP_201_CREATED)


class CallbackEndpointDetailView(generics.GenericAPIView):
    serializer_class = CallbackEndpointSerializer

    def get_queryset(self):
        return callback_endpoints_for_client(client=self.request.auth)

    def get(self, request: Request, pk: int) -> Response:
        return Response(CallbackEndpointSerializer(self.get_object()).data)

    @extend_schema(request=CallbackEndpointUpdateSerializer, responses={200: CallbackEndpointSerializer})
    def patch(self, request: Request, pk: int) -> Response:
        """Change any of the fields given; disabling parks its pending callbacks as dead letters."""
        endpoint = self.get_object()
        given = CallbackEndpointUpdateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            endpoint = callback_endpoint_update(endpoint=endpoint, changes=given.validated_data)
        except EndpointUrlTaken as exc:
            return Response({"url": [str(exc)]}, status=status.HTTP_400_BAD_REQUEST)
        return Response(CallbackEndpointSerializer(endpoint).data)

    @extend_schema(
        responses={204: OpenApiResponse(description="Deleted, with every callback to it: pending ones are dropped.")}
    )
    def delete(self, request: Request, pk: int) -> Response:
        """Delete the endpoint and its callbacks (pending ones are never sent). Disable it to keep them."""
        callback_endpoint_delete(endpoint=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class CallbackEndpointSecretView(generics.GenericAPIView):
    serializer_class = CallbackEndpointSecretsSerializer

    def get_queryset(self):
        return callback_endpoints_for_client(client=self.request.auth)

    def get(self, request: Request, pk: int) -> Response:
        """The secrets that sign the endpoint's callbacks now, newest first."""
        return Response(_secrets(self.get_object()))


class CallbackEndpointRotateSecretView(generics.GenericAPIView):
    serializer_class = CallbackEndpointSecretsSerializer

    def get_queryset(self):
        return callback_endpoints_for_client(client=self.request.auth)

    @extend_schema(request=None, responses={200: CallbackEndpointSecretsSerializer})
    def post(self, request: Request, pk: int) -> Response:
        """A new secret signs from now on; the previous ones sign beside it for
        CALLBACK_SECRET_OVERLAP_SECONDS (24 h by default), so receivers can switch without a gap."""
        endpoint = callback_endpoint_rotate_secret(endpoint_id=self.get_object().pk)
        return Response(_secrets(endpoint))
