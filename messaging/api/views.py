"""Thin API views: parse, call one service, shape the response."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import django_filters
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import DatabaseError
from django.utils import timezone
from django_filters.fields import IsoDateTimeField
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from messaging.api.errors import database_unavailable
from messaging.api.schema import CancelConflictSerializer
from messaging.api.serializers import (
    IDEMPOTENCY_KEY_MAX_LENGTH,
    NO_CONTROL_SCHEMA_PATTERN,
    BatchResultSerializer,
    BatchSerializer,
    DeadLetterDetailSerializer,
    DeadLetterListQuerySerializer,
    DeadLetterReplaySerializer,
    DeadLetterSerializer,
    MessageCreateSerializer,
    MessageDetailSerializer,
    MessageSerializer,
    ReplayResultSerializer,
    dead_letter_criteria,
    message_create_validate,
    message_renderer,
    no_control_characters,
)
from messaging.conf import messaging_setting
from messaging.ingest import BatchItem, ItemResult, messages_create_many
from messaging.limits import PriorityNotAllowed, QuotaExceeded
from messaging.models import ApiClient, EventSource, Message, scheduled_waiting
from messaging.replay import dead_letters_replay
from messaging.routing import Channel, Priority
from messaging.selectors import (
    dead_letter_detail_for_client,
    dead_letters_matching,
    message_detail_for_client,
    messages_for_client,
)
from messaging.services import (
    IdempotencyConflict,
    IdempotencyInFlight,
    NotCancellable,
    message_cancel,
    message_create,
)
from messaging.states import MessageState

REPLAYED_HEADER = "Idempotent-Replayed"
IDEMPOTENCY_HEADER = "Idempotency-Key"


class UtcIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 time in UTC: PostgreSQL refuses a UTC offset past 15:59 (ISO 8601 allows any),
    and one that leaves the calendar (year 1 at +05:00) is out of range: both a 400, not a 500."""

    def clean(self, value: Any) -> datetime | None:
        cleaned = super().clean(value)
        if cleaned is None:
            return None
        try:
            return cleaned.astimezone(UTC)
        except OverflowError:
            raise DjangoValidationError("This time is out of range.", code="overflow") from None


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = UtcIsoDateTimeField


class MessageFilter(django_filters.FilterSet):
    state = django_filters.ChoiceFilter(choices=MessageState.choices)
    channel = django_filters.ChoiceFilter(choices=Channel.choices)
    priority = django_filters.ChoiceFilter(choices=Priority.choices)
    category = django_filters.CharFilter()
    created_after = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UtcIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    scheduled = django_filters.BooleanFilter(
        method="filter_scheduled",
        help_text="true: only scheduled messages still waiting (accepted, send_at in the future; they can "
        "still be cancelled); false: all but those.",
    )

    class Meta:
        model = Message
        fields = ["state", "channel", "priority", "category", "created_after", "created_before", "scheduled"]

    def filter_scheduled(self, queryset, name: str, value: bool):
        waiting = scheduled_waiting(timezone.now())
        return queryset.filter(waiting) if value else queryset.exclude(waiting)


class NewestFirstPagination(CursorPagination):
    """Messages and dead letters alike: newest first, stable under inserts (a cursor, not an offset)."""

    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500


Answer = tuple[int, dict[str, Any], dict[str, str]]  # HTTP status, body, headers
DATABASE_DOWN = {"detail": "The database is unavailable; this item was not stored."}


def _header_key_errors(header_key: str | None) -> list[str]:
    """Why the Idempotency-Key header cannot be a key (the body's idempotency_key is held to the same)."""
    if not header_key:
        return []
    if len(header_key) > IDEMPOTENCY_KEY_MAX_LENGTH:
        limit = IDEMPOTENCY_KEY_MAX_LENGTH
        return [f"Ensure this header has no more than {limit} characters (it has {len(header_key)})."]
    try:
        no_control_characters(header_key)
    except DjangoValidationError as exc:
        return list(exc.messages)
    return []


def _create_one(client: ApiClient, data: Any, header_key: str | None) -> Answer:
    """Validate and accept one message."""
    header_key = header_key.strip() if header_key else header_key
    header_errors = _header_key_errors(header_key)
    if header_errors:
        return status.HTTP_400_BAD_REQUEST, {IDEMPOTENCY_HEADER: header_errors}, {}
    fields, errors = message_create_validate(data)
    if errors is not None:
        return status.HTTP_400_BAD_REQUEST, errors, {}
    body_key = fields.pop("idempotency_key", None)
    if header_key and body_key and header_key != body_key:
        return 400, {"idempotency_key": ["The Idempotency-Key header and the body's idempotency_key differ."]}, {}
    key = header_key or body_key
    try:
        result: ItemResult = message_create(client=client, fields=fields, idempotency_key=key)
    except (IdempotencyConflict, IdempotencyInFlight, PriorityNotAllowed, QuotaExceeded) as exc:
        result = exc
    return _answer(result, lambda message: MessageSerializer(message).data)


def _answer(result: ItemResult, render: Callable[[Message], dict[str, Any]]) -> Answer:
    """The answer to one accepted (or refused) message. Shared by single and batch."""
    if isinstance(result, IdempotencyConflict):
        return (
            422,
            {
                "idempotency_key": ["This key was already used with a different payload."],
                "message_id": str(result.message.pk),
            },
            {},
        )
    if isinstance(result, PriorityNotAllowed):
        return status.HTTP_403_FORBIDDEN, {"priority": [str(result)]}, {}
    if isinstance(result, QuotaExceeded):
        return (
            status.HTTP_429_TOO_MANY_REQUESTS,
            {"channel": [str(result)]},
            {"Retry-After": str(result.retry_after_s)},
        )
    if isinstance(result, IdempotencyInFlight):
        return (
            409,
            {"idempotency_key": ["A request with this key is still in flight; retry shortly."]},
            {"Retry-After": "1"},
        )
    body = render(result.message)
    if result.created:
        return status.HTTP_201_CREATED, body, {}
    return status.HTTP_200_OK, body, {REPLAYED_HEADER: "true"}


class MessageListCreateView(generics.ListAPIView):
    serializer_class = MessageSerializer
    filterset_class = MessageFilter
    pagination_class = NewestFirstPagination

    def get_queryset(self):
        return messages_for_client(client=self.request.auth)

    @extend_schema(
        request=MessageCreateSerializer,
        responses={
            201: MessageSerializer,
            200: OpenApiResponse(MessageSerializer, description="A replay: the same key and payload as before."),
            409: OpenApiResponse(OpenApiTypes.OBJECT, description="A request with this key is still in flight."),
            422: OpenApiResponse(OpenApiTypes.OBJECT, description="This key was used with a different payload."),
        },
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX_LENGTH, "pattern": NO_CONTROL_SCHEMA_PATTERN},
                OpenApiParameter.HEADER,
                required=False,
                description="A key of the client's choosing: the same key and payload again is answered 200 "
                "with the same message, never stored twice. Kept at least 24 h.",
            )
        ],
    )
    def post(self, request: Request) -> Response:
        code, body, headers = _create_one(request.auth, request.data, request.headers.get(IDEMPOTENCY_HEADER))
        return Response(body, status=code, headers=headers)


class MessageBatchView(APIView):
    @extend_schema(request=BatchSerializer, responses={200: BatchResultSerializer})
    def post(self, request: Request) -> Response:
        """Each item is accepted or refused on its own; results keep the request's order."""
        batch = BatchSerializer(data=request.data)
        batch.is_valid(raise_exception=True)
        answers: list[Answer | None] = []
        valid: list[BatchItem] = []
        for data in batch.validated_data["messages"]:
            fields, errors = message_create_validate(data)
            if errors is not None:
                answers.append((status.HTTP_400_BAD_REQUEST, errors, {}))
                continue
            answers.append(None)
            valid.append(BatchItem(fields=fields, idempotency_key=fields.pop("idempotency_key", None)))
        try:
            outcomes = iter(messages_create_many(client=request.auth, items=valid))
        except DatabaseError as exc:  # the batch is one transaction: none of its items was stored
            if not database_unavailable(exc):
                raise  # a refused value is a bug to see (500), not an outage to retry for ever
            outcomes = None
        render = message_renderer()
        results = []
        for index, answer in enumerate(answers):
            if answer is None:
                answer = (503, DATABASE_DOWN, {}) if outcomes is None else _answer(next(outcomes), render)
            code, body, _ = answer
            entry: dict[str, Any] = {"index": index, "status": code}
            entry["message" if code in (200, 201) else "errors"] = body
            results.append(entry)
        counts = {
            "created": sum(r["status"] == 201 for r in results),
            "replayed": sum(r["status"] == 200 for r in results),
            "failed": sum(r["status"] >= 400 for r in results),
        }
        return Response({**counts, "results": results}, status=status.HTTP_200_OK)


class MessageDetailView(generics.RetrieveAPIView):
    serializer_class = MessageDetailSerializer

    def get_queryset(self):
        return message_detail_for_client(client=self.request.auth)


class MessageCancelView(generics.GenericAPIView):
    serializer_class = MessageSerializer

    def get_queryset(self):
        return messages_for_client(client=self.request.auth)

    @extend_schema(request=None, responses={200: MessageSerializer, 409: CancelConflictSerializer})
    def post(self, request: Request, pk: str) -> Response:
        message = self.get_object()
        try:
            message = message_cancel(message=message)
        except NotCancellable as exc:
            return Response({"detail": str(exc), "state": message.state}, status=status.HTTP_409_CONFLICT)
        return Response(MessageSerializer(message).data)


# --- dead letters ---------------------------------------------------------------------------------
class DeadLetterListView(generics.ListAPIView):
    """The client's dead letters, newest first; filters as for messages plus error_type and provider."""

    serializer_class = DeadLetterSerializer
    pagination_class = NewestFirstPagination
    filter_backends: list = []

    def get_queryset(self):
        query = DeadLetterListQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        status_filter = query.validated_data.get("status")
        parked = None if status_filter is None else status_filter == "parked"
        criteria = dead_letter_criteria(query.validated_data, client=self.request.auth, parked=parked)
        return dead_letters_matching(criteria=criteria).select_related("callback__endpoint")

    @extend_schema(parameters=[DeadLetterListQuerySerializer])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)


class DeadLetterDetailView(generics.RetrieveAPIView):
    """One dead letter with the message as accepted and every attempt."""

    serializer_class = DeadLetterDetailSerializer

    def get_queryset(self):
        return dead_letter_detail_for_client(client=self.request.auth)


class DeadLetterReplayView(APIView):
    @extend_schema(request=DeadLetterReplaySerializer, responses={200: ReplayResultSerializer})
    def post(self, request: Request) -> Response:
        """Replay the client's parked dead letters that match the filter, oldest first, at most
        `limit` (and REPLAY_API_MAX_ITEMS) per call; `remaining` says how many are left."""
        replay = DeadLetterReplaySerializer(data=request.data)
        replay.is_valid(raise_exception=True)
        options = replay.validated_data
        matching = dead_letters_matching(criteria=dead_letter_criteria(options, client=request.auth, parked=True))
        matched = matching.count()
        limit = min(options.get("limit", matched), messaging_setting("REPLAY_API_MAX_ITEMS"))
        report = dead_letters_replay(
            selection=matching[:limit],
            actor=request.auth.name,
            via=EventSource.API,
            force=options["force"],
            dry_run=options["dry_run"],
        )
        remaining = matched - report.selected
        return Response({**report.as_dict(), "matched": matched, "remaining": remaining})
