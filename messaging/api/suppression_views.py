"""Thin API views of a client's suppression list: parse, call one service, shape the response."""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions, generics, status
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from messaging.api.parsers import RequestTooLarge
from messaging.api.schema import ErrorSerializer
from messaging.api.suppression_serializers import (
    SuppressionCreateSerializer,
    SuppressionImportResultSerializer,
    SuppressionLiftSerializer,
    SuppressionListQuerySerializer,
    SuppressionSerializer,
)
from messaging.api.views import NewestFirstPagination
from messaging.suppressions.files import ImportRefused, suppressions_import
from messaging.suppressions.selectors import suppressions_for_client
from messaging.suppressions.services import suppression_add, suppression_lift

# 10,000 lines of an address, a scope and a note of a few hundred characters.
IMPORT_MAX_BYTES = 8 * 1024 * 1024


class CsvTextParser(BaseParser):
    """A text/csv body as text (UTF-8), at most IMPORT_MAX_BYTES."""

    media_type = "text/csv"

    def parse(self, stream, media_type=None, parser_context=None) -> str:
        raw = stream.read(IMPORT_MAX_BYTES + 1) if stream is not None else b""
        if len(raw) > IMPORT_MAX_BYTES:
            raise RequestTooLarge(IMPORT_MAX_BYTES)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(f"The CSV is not UTF-8: {exc}.") from None


class SuppressionListCreateView(generics.ListAPIView):
    """The client's suppressions, newest first; lifted ones too unless active=true."""

    serializer_class = SuppressionSerializer
    pagination_class = NewestFirstPagination
    filter_backends: list = []

    def get_queryset(self):
        query = SuppressionListQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        return suppressions_for_client(client=self.request.auth, **query.validated_data)

    @extend_schema(parameters=[SuppressionListQuerySerializer])
    def get(self, request: Request, *args, **kwargs) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=SuppressionCreateSerializer,
        responses={
            201: SuppressionSerializer,
            200: OpenApiResponse(SuppressionSerializer, description="Already suppressed: the active one as it is."),
        },
    )
    def post(self, request: Request) -> Response:
        """Suppress an address for your messages on a channel (in a scope, or every non-exempt category)."""
        given = SuppressionCreateSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        suppression, created = suppression_add(client=request.auth, source="api", **given.validated_data)
        code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
        return Response(SuppressionSerializer(suppression).data, status=code)


class SuppressionDetailView(generics.RetrieveAPIView):
    serializer_class = SuppressionSerializer

    def get_queryset(self):
        return suppressions_for_client(client=self.request.auth)


class SuppressionLiftView(generics.GenericAPIView):
    serializer_class = SuppressionSerializer

    def get_queryset(self):
        return suppressions_for_client(client=self.request.auth)

    @extend_schema(
        request=SuppressionLiftSerializer,
        responses={200: SuppressionSerializer, 409: OpenApiResponse(ErrorSerializer, description="Already lifted.")},
    )
    def post(self, request: Request, pk: int) -> Response:
        """Lift it: messages to the address go out again. The row is kept, with when, why and by whom."""
        suppression = self.get_object()
        given = SuppressionLiftSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        by = f"client {request.auth.name} (api)"
        if not suppression_lift(suppression=suppression, reason=given.validated_data["reason"], by=by):
            suppression.refresh_from_db()
            return Response(
                {
                    "detail": f"Already lifted at {suppression.lifted_at.isoformat()}.",
                    "lifted_at": suppression.lifted_at,
                },
                status=status.HTTP_409_CONFLICT,
            )
        return Response(SuppressionSerializer(suppression).data)


class SuppressionImportView(APIView):
    parser_classes = [CsvTextParser]

    @extend_schema(
        request={"text/csv": OpenApiTypes.STR},
        responses={
            200: SuppressionImportResultSerializer,
            400: OpenApiResponse(ErrorSerializer, description="No header row, an unknown column, too many lines."),
        },
    )
    def post(self, request: Request) -> Response:
        """Add suppressions from a CSV body (Content-Type: text/csv, UTF-8): a header row naming the
        columns channel,address[,scope,reason,note], then at most 10,000 lines (IMPORT_MAX_LINES). Each line is
        added or refused whole (errors name its line and field); reason, if given, is manual."""
        try:
            text = request.data if isinstance(request.data, str) else ""  # an empty body parses to {}
            report = suppressions_import(client=request.auth, text=text, source="api import")
        except ImportRefused as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_400_BAD_REQUEST)
        return Response(report.as_dict())
