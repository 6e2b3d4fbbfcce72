"""The API's JSON parser: a request body sized by the product's limits (413 past them), and no
JSON the rest of the stack cannot handle (too deep, non-finite numbers) gets past it."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from rest_framework import exceptions, status
from rest_framework.parsers import BaseParser

from messaging.conf import messaging_setting

# Room per item for everything but the body and the metadata: the other fields at their longest
# (to 320, subject 998, keys 3 x 255, a deadline, fallback addresses) and JSON's punctuation.
ITEM_OVERHEAD_BYTES = 8 * 1024
# A body's characters as UTF-8 bytes at worst (the limits count characters).
UTF8_MAX_BYTES_PER_CHARACTER = 4
REQUEST_OVERHEAD_BYTES = 64 * 1024


def api_max_request_bytes() -> int:
    """The largest request body the API reads: API_MAX_REQUEST_BYTES (64 MiB by default), or with
    0 a full batch (BATCH_MAX_ITEMS) of messages at the longest body of any channel plus the
    largest metadata."""
    configured = messaging_setting("API_MAX_REQUEST_BYTES")
    if configured:
        return int(configured)
    longest_body = max(messaging_setting("BODY_MAX_LENGTH").values()) * UTF8_MAX_BYTES_PER_CHARACTER
    item = longest_body + messaging_setting("METADATA_MAX_BYTES") + ITEM_OVERHEAD_BYTES
    return messaging_setting("BATCH_MAX_ITEMS") * item + REQUEST_OVERHEAD_BYTES


class RequestTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self, limit: int):
        super().__init__(
            f"The request body is over the API's limit of {limit} bytes (API_MAX_REQUEST_BYTES); "
            f"split it into smaller batches."
        )
        self.limit = limit


class ApiJSONParser(BaseParser):
    """DRF's JSONParser, but it reads at most api_max_request_bytes() (Django's 2.5 MB
    DATA_UPLOAD_MAX_MEMORY_SIZE is for forms: DRF applies it to any parser derived from
    JSONParser, hence BaseParser) and refuses nesting deeper than JSON_MAX_DEPTH, naming where."""

    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None) -> Any:
        limit = api_max_request_bytes()
        request = (parser_context or {}).get("request")
        declared = _content_length(request.META if request is not None else {})
        if declared > limit:
            raise RequestTooLarge(limit)  # refused before reading a byte of it
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise RequestTooLarge(limit)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise exceptions.ParseError(f"JSON parse error - the body is not UTF-8: {exc}") from None
        max_depth = messaging_setting("JSON_MAX_DEPTH")
        try:
            data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        except RecursionError:
            raise _too_deep(_deep_path(text, max_depth), max_depth) from None
        except ValueError as exc:
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
        path = _path_past_depth(data, max_depth)
        if path is not None:
            raise _too_deep(path, max_depth)
        return data


def _content_length(meta: dict[str, Any]) -> int:
    try:
        return int(meta.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return 0


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: valid JSON, but PostgreSQL's jsonb and JSON output refuse it
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def _path_past_depth(data: Any, max_depth: int) -> tuple[Any, ...] | None:
    """The path to a container nested deeper than max_depth, or None (iterative: no recursion)."""
    if type(data) is not dict and type(data) is not list:
        return None
    pending: list[tuple[Any, int, tuple[Any, ...]]] = [(data, 1, ())]
    while pending:
        node, depth, path = pending.pop()
        if depth > max_depth:
            return path
        items = node.items() if type(node) is dict else enumerate(node)
        for key, value in items:
            if type(value) is dict or type(value) is list:
                pending.append((value, depth + 1, (*path, key)))
    return None


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]', re.DOTALL)


def _deep_path(text: str, max_depth: int) -> tuple[Any, ...]:
    """Where JSON too deep for json.loads (it recursed) first goes past max_depth: a token scan."""
    stack: list[list[Any]] = []  # per open container: [kind, the current key or index]
    last_string = None
    for match in _TOKEN.finditer(text):
        token = match.group()
        if token[0] == '"':
            last_string = token
        elif token in "{[":
            if len(stack) >= max_depth:
                break
            stack.append([token, None if token == "{" else 0])
        elif token in "}]":
            if stack:
                stack.pop()
        elif token == ":" and stack and last_string is not None:
            try:
                stack[-1][1] = json.loads(last_string)
            except ValueError:
                stack[-1][1] = last_string
        elif token == "," and stack and stack[-1][0] == "[":
            stack[-1][1] += 1
    return tuple(entry[1] for entry in stack if entry[1] is not None)


def _too_deep(path: tuple[Any, ...], max_depth: int) -> exceptions.ValidationError:
    """A 400 naming the field: the message's (metadata), or the batch item's (messages/3/metadata)."""
    message = f"Nested deeper than {max_depth} levels of JSON."
    field = path[:3] if path[:1] == ("messages",) and len(path) > 1 else path[:1]
    if not field:
        return exceptions.ValidationError({"detail": message})
    detail: Any = [message]
    for key in reversed(field):
        detail = {str(key): detail}
    return exceptions.ValidationError(detail)
