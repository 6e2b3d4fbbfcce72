"""Provider receipt webhooks: verify the signature, parse, store, answer; applied later in batches."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from messaging.receipts import receipts_store
from messaging.routing import routed_providers
from providers.registry import get_provider
from providers.types import WebhookSignatureError, WebhookStateUnavailable

logger = logging.getLogger(__name__)


@csrf_exempt
@require_http_methods(["GET", "POST"])  # Vonage can be set to deliver receipts as GET
def provider_webhook(request: HttpRequest, provider_name: str) -> HttpResponse:
    """404 for a provider no route sends through; 403 on a bad or missing signature and 400 on a
    payload we cannot read (nothing stored either way); 204 once stored; a 5xx for anything else
    (the database down) so that the provider retries."""
    if provider_name not in routed_providers():
        return JsonResponse({"detail": f"no configured route sends through {provider_name!r}"}, status=404)
    provider = get_provider(provider_name)
    try:
        events = provider.parse_webhook(request)
    except WebhookSignatureError as exc:
        logger.warning("refused %s webhook: %s", provider_name, exc)
        return JsonResponse({"detail": "invalid signature"}, status=403)
    except ValueError as exc:
        logger.warning("unreadable %s webhook: %s", provider_name, exc)
        return JsonResponse({"detail": str(exc)}, status=400)
    except WebhookStateUnavailable as exc:  # replay checks cannot run (Redis): the provider retries
        logger.error("refused %s webhook for now: %s", provider_name, exc)
        return JsonResponse({"detail": "cannot check for replays now; retry later"}, status=503)
    receipts_store(events=events)
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
