"""Bearer API keys: hashed lookup, one client per key."""

from __future__ import annotations

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from messaging.models import ApiClient, ApiKey
from messaging.selectors import api_key_active
from messaging.services import hash_api_key


class ClientPrincipal:
    """What request.user is for an API call: the client, authenticated."""

    is_authenticated = True
    is_anonymous = False
    is_staff = False

    def __init__(self, client: ApiClient):
        self.client = client

    def __str__(self) -> str:
        return f"client:{self.client.name}"


class ApiKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, raw_key = header.strip().partition(" ")
        # Auth schemes are case-insensitive (RFC 7235 section 2.1): "bearer <key>" is as good.
        if scheme.lower() != self.keyword.lower() or not raw_key.strip():
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <API key>'.")
        key = api_key_active(key_hash=hash_api_key(raw_key.strip()))
        if key is None:
            raise exceptions.AuthenticationFailed(
                "Unknown or revoked API key. Create one with manage.py create_api_key NAME."
            )
        # At most one write a minute per key: last-used is for operators, not a hot-path cost.
        now = timezone.now()
        if key.last_used_at is None or (now - key.last_used_at).total_seconds() > 60:
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        return ClientPrincipal(key.client), key.client

    def authenticate_header(self, request) -> str:
        return self.keyword


class IsApiClient(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, ApiClient)


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Describes the bearer API key in the OpenAPI schema (/api/schema/, /api/docs/)."""

    target_class = ApiKeyAuthentication
    name = "ApiKey"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key from `manage.py create_api_key NAME`: `Authorization: Bearer <key>`.",
        }
