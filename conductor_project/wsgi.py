"""WSGI entry point for gunicorn: Django, with provider receipt webhooks taken straight to their view.

A campaign's receipts come in thousands a second, and for each one Django's middleware (sessions,
auth, CSRF, messages, static files) and URL resolver cost more than the view's own work, while
doing nothing for it: a webhook has no session, no user and no CSRF token, and its signature is
its authentication. POST /webhooks/<provider>/ therefore goes to messaging.webhooks.provider_webhook
directly (the same view the URLconf names, with Django's request object and the request
started/finished signals that manage database connections); everything else, anymail's tracking
webhooks included, goes through Django as usual.
"""

import logging
import os
import re

from django.core import signals
from django.core.handlers.wsgi import WSGIRequest
from django.core.wsgi import get_wsgi_application
from django.http import HttpResponse, JsonResponse

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "conductor_project.settings.base")
django_application = get_wsgi_application()

from conductor_project.checks import refuse_to_start_on_errors  # noqa: E402  (needs the apps loaded above)
from messaging.webhooks import provider_webhook  # noqa: E402

refuse_to_start_on_errors("the web process")

logger = logging.getLogger("conductor_project.wsgi")
_RECEIPT_WEBHOOK = re.compile(r"/webhooks/(?P<provider>[a-z0-9_]+)/")


class ReceiptWebhookFastPath:
    """The WSGI application: receipt webhooks to their view, the rest to Django."""

    def __init__(self, django_app):
        self.django_app = django_app

    def __call__(self, environ, start_response):
        match = _RECEIPT_WEBHOOK.fullmatch(environ.get("PATH_INFO", ""))
        if match is None or match["provider"] == "anymail" or environ.get("SCRIPT_NAME"):
            return self.django_app(environ, start_response)
        signals.request_started.send(sender=self.__class__, environ=environ)
        request = WSGIRequest(environ)
        try:
            response = provider_webhook(request, match["provider"])
        except Exception:  # as Django's handler: logged, and a 5xx so that the provider retries
            logger.exception("receipt webhook for %s failed", match["provider"])
            response = JsonResponse({"detail": "internal error; retry later"}, status=500)
        if not isinstance(response, HttpResponse):  # pragma: no cover - the view returns one
            raise TypeError("provider_webhook returned no HttpResponse")
        # Closing the response sends request_finished (connections returned), as under Django.
        response._resource_closers.append(request.close)
        start_response(f"{response.status_code} {response.reason_phrase}", list(response.items()))
        return response


application = ReceiptWebhookFastPath(django_application)
