"""What the OpenAPI schema says the API answers besides success: every error status an operation
can give, in the shapes messaging.api.errors and DRF give them."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    detail = serializers.CharField(help_text="What went wrong, in words.")


class RequestTooLargeSerializer(ErrorSerializer):
    max_bytes = serializers.IntegerField(help_text="The limit the request went over (API_MAX_REQUEST_BYTES).")


class CancelConflictSerializer(ErrorSerializer):
    state = serializers.CharField(help_text="The message's state, which no longer allows a cancel.")


FIELD_ERRORS = OpenApiResponse(
    response=OpenApiTypes.OBJECT,
    description="Bad input, nothing stored: each bad field named with a list of what is wrong "
    '(e.g. {"to": ["Not a valid phone number."]}; nested for a batch item\'s field; '
    '"detail" for malformed JSON).',
)
UNAUTHENTICATED = OpenApiResponse(
    response=ErrorSerializer, description="No API key, an unknown or revoked one, or not `Bearer <key>`."
)
NOT_FOUND = OpenApiResponse(
    response=ErrorSerializer, description="No such object of this client's (or, for a list, an invalid cursor)."
)
TOO_LARGE = OpenApiResponse(
    response=RequestTooLargeSerializer,
    description="The request body is over API_MAX_REQUEST_BYTES (64 MiB by default); nothing stored.",
)
UNSUPPORTED_MEDIA_TYPE = OpenApiResponse(response=ErrorSerializer, description="The body is not application/json.")
URI_TOO_LONG = OpenApiResponse(
    description="The request line (the URL with its query) is over the web server's limit "
    "(gunicorn's limit_request_line, 4,094 bytes): answered by gunicorn, not as JSON."
)
THROTTLED = OpenApiResponse(
    response=ErrorSerializer,
    description="Over the client's request rate (api_rate), or for a message its channel's daily quota "
    "(naming `channel`); nothing stored. Retry after Retry-After seconds.",
)
PRIORITY_NOT_ALLOWED = OpenApiResponse(
    response=OpenApiTypes.OBJECT,
    description='A priority this client may not send (allowed_priorities), named: {"priority": ["…"]}; nothing stored.',
)
DATABASE_DOWN = OpenApiResponse(
    response=ErrorSerializer,
    description="The database is unavailable; nothing was stored. Retry after Retry-After seconds "
    "(with the same idempotency key).",
)


class ConductorAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, plus the error answers each operation can give: 401 (with a
    key required; 429 with it), 400, 413 and 415 (with a request body), 400 and 404 (list filters
    and cursor), 403 (creating a message: a priority not allowed), 404 (an object in the path), 414
    (gunicorn's URL limit), 503 (database down). An operation's
    own @extend_schema wins."""

    def _get_response_bodies(self, direction: str = "response") -> dict[str, Any]:
        responses = super()._get_response_bodies(direction)
        if direction != "response":
            return responses
        for code, response in self._error_responses().items():
            if str(code) not in responses:
                responses[str(code)] = self._get_response_for_code(response, str(code), direction=direction)
        return responses

    def _error_responses(self) -> dict[int, OpenApiResponse]:
        errors: dict[int, OpenApiResponse] = {}
        if self.method in ("POST", "PUT", "PATCH") and self.get_request_serializer() is not None:
            errors.update({400: FIELD_ERRORS, 413: TOO_LARGE, 415: UNSUPPORTED_MEDIA_TYPE})
        if self.method == "GET" and self._is_list_view():
            errors.update({400: FIELD_ERRORS, 404: NOT_FOUND})
        if "{" in self.path:
            errors[404] = NOT_FOUND
        if self.get_auth():
            errors[401] = UNAUTHENTICATED
            errors[429] = THROTTLED
        if self.method == "POST" and self.path.rstrip("/").endswith("/messages"):
            errors[403] = PRIORITY_NOT_ALLOWED
        errors[414] = URI_TOO_LONG
        errors[503] = DATABASE_DOWN
        return errors
