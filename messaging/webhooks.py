"""Provider webhooks: receipts (verify the signature, parse, store, answer; applied later in
batches) and inbound messages (verified the same way; a STOP, START or HELP acted on at once)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from messaging.logging import scrubbed
from messaging.receipts import receipts_store
from messaging.routing import routed_providers
from messaging.suppressions.inbound import inbound_receive
from providers.registry import get_provider
from providers.types import (
    InboundMessage,
    InboundNotSupported,
    ReceiptEvent,
    WebhookSignatureError,
    WebhookStateUnavailable,
)

logger = logging.getLogger(__name__)


class WebhookRefused(Exception):
    """A receipt webhook we answer with an error and store nothing of: `status` and `detail` say why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def webhook_events(request: HttpRequest, provider_name: str) -> list[ReceiptEvent]:
    """The receipts of a provider's webhook, verified; WebhookRefused with 404 for a provider no
    route sends through, 403 on a bad or missing signature, 400 on a payload we cannot read and
    503 when the replay checks cannot run (the provider retries). Shared by the Django view and
    the receipt intake server, which answer the same way."""
    if provider_name not in routed_providers():
        raise WebhookRefused(404, f"no configured route sends through {provider_name!r}")
    provider = get_provider(provider_name)
    try:
        return provider.parse_webhook(request)
    except WebhookSignatureError as exc:
        logger.warning("refused %s webhook: %s", provider_name, exc)
        raise WebhookRefused(403, "invalid signature") from exc
    except ValueError as exc:
        logger.warning("unreadable %s webhook: %s", provider_name, scrubbed(str(exc)))  # it may quote the payload
        raise WebhookRefused(400, str(exc)) from exc
    except WebhookStateUnavailable as exc:  # replay checks cannot run (Redis): the provider retries
        logger.error("refused %s webhook for now: %s", provider_name, exc)
        raise WebhookRefused(503, "cannot check for replays now; retry later") from exc


@csrf_exempt
@require_http_methods(["GET", "POST"])  # Vonage can be set to deliver receipts as GET
def provider_webhook(request: HttpRequest, provider_name: str) -> HttpResponse:
    """An error as webhook_events says (nothing stored); 204 once stored; a 5xx for anything
    else (the database down) so that the provider retries."""
    try:
        events = webhook_events(request, provider_name)
    except WebhookRefused as refused:
        return JsonResponse({"detail": refused.detail}, status=refused.status)
    receipts_store(events=events)
    return HttpResponse(status=204)


def inbound_message(request: HttpRequest, provider_name: str) -> InboundMessage:
    """The verified message of a provider's inbound webhook; WebhookRefused with 404 for a
    provider no route sends through or that has no inbound webhook, 403 on a bad or missing
    signature, 400 on a payload we cannot read (nothing changes in any of them)."""
    if provider_name not in routed_providers():
        raise WebhookRefused(404, f"no configured route sends through {provider_name!r}")
    try:
        return get_provider(provider_name).parse_inbound_webhook(request)
    except InboundNotSupported as exc:
        raise WebhookRefused(404, str(exc)) from exc
    except WebhookSignatureError as exc:
        logger.warning("refused %s inbound webhook: %s", provider_name, exc)
        raise WebhookRefused(403, "invalid signature") from exc
    except ValueError as exc:
        logger.warning("unreadable %s inbound webhook: %s", provider_name, scrubbed(str(exc)))
        raise WebhookRefused(400, str(exc)) from exc


@csrf_exempt
@require_http_methods(["GET", "POST"])  # Vonage can be set to deliver inbound messages as GET
def provider_inbound_webhook(request: HttpRequest, provider_name: str) -> HttpResponse:
    """An inbound message (a recipient's STOP, START, HELP or other): an error as inbound_message
    says; acted on, then answered 200 with the provider's reply document (Twilio: TwiML, with
    the HELP text) or 204. An unattributed keyword is answered 200 too (providers retry errors)."""
    try:
        inbound = inbound_message(request, provider_name)
    except WebhookRefused as refused:
        return JsonResponse({"detail": refused.detail}, status=refused.status)
    provider = get_provider(provider_name)
    outcome = inbound_receive(inbound=inbound, replies_in_answer=provider.replies_in_answer)
    if provider.replies_in_answer:
        content_type, body = provider.inbound_answer(outcome.reply)
        return HttpResponse(body, content_type=content_type)
    return HttpResponse(status=204)


def routed_only(provider_name: str, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """`view` (anymail's tracking view for an ESP) answering 404 while no route sends through
    `provider_name`, as provider_webhook does: we take no receipts from a provider we do not use."""

    @csrf_exempt
    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if provider_name not in routed_providers():
            return JsonResponse({"detail": f"no configured route sends through {provider_name!r}"}, status=404)
        return view(request, *args, **kwargs)

    return guarded
