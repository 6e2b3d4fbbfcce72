"""Provider receipt webhooks: verify the signature, parse, store and apply (anymail's flow)."""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from messaging.receipts import receipt_record
from providers.registry import PROVIDER_CLASSES, get_provider
from providers.types import WebhookSignatureError, WebhookStateUnavailable

logger = logging.getLogger(__name__)


@csrf_exempt
@require_http_methods(["GET", "POST"])  # Vonage can be set to deliver receipts as GET
def provider_webhook(request: HttpRequest, provider_name: str) -> HttpResponse:
    """403 on a bad or missing signature (nothing changes); 400 on a payload we cannot read;
    a 5xx for anything else so that the provider retries."""
    if provider_name not in PROVIDER_CLASSES:
        return JsonResponse({"detail": f"unknown provider {provider_name!r}"}, status=404)
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
    for event in events:
        receipt_record(event=event)
    return HttpResponse(status=204)
