"""The one-click unsubscribe endpoint (RFC 8058), thin: messaging.suppressions.unsubscribe decides.

POST /unsubscribe/<token>/ unsubscribes (a mailbox provider's one-click POST, body
`List-Unsubscribe=One-Click`, or the button of the GET page); GET only shows that page, because
link scanners and previews fetch every URL of an email. No login, no CSRF token: the signed
token is the authority, and a forged or altered one is a 400 that stores nothing.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.utils.html import format_html
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from messaging.suppressions.unsubscribe import (
    ONE_CLICK,
    InvalidUnsubscribeToken,
    unsubscribe_one_click,
    unsubscribe_target,
)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{title}</title></head>
<body style="font-family: sans-serif; max-width: 32rem; margin: 3rem auto; padding: 0 1rem">
<h1 style="font-size: 1.4rem">{title}</h1>{body}</body></html>"""


def _page(title: str, body: str, status: int = 200) -> HttpResponse:
    html = format_html(_PAGE, title=title, body=body)  # `body` is already format_html's (escaped) output
    response = HttpResponse(html, status=status, content_type="text/html; charset=utf-8")
    response["Cache-Control"] = "no-store"
    response["Referrer-Policy"] = "no-referrer"  # the token must not leak to another site
    return response


def _invalid() -> HttpResponse:
    return _page(
        "This unsubscribe link is not valid",
        format_html("<p>{}</p>", "The link is incomplete or was altered. Nothing was changed."),
        status=400,
    )


@csrf_exempt
@require_http_methods(["GET", "HEAD", "POST"])
def one_click_unsubscribe(request: HttpRequest, token: str) -> HttpResponse:
    if request.method == "POST":
        try:
            suppression, _ = unsubscribe_one_click(token=token)
        except InvalidUnsubscribeToken:
            return _invalid()
        what = f"{suppression.scope} emails" if suppression.scope else "these emails"
        return _page("You are unsubscribed", format_html("<p>You will no longer receive {}.</p>", what))
    try:
        target = unsubscribe_target(token)
    except InvalidUnsubscribeToken:
        return _invalid()
    what = f"{target.scope} emails" if target.scope else "these emails"
    name, _, value = ONE_CLICK.partition("=")
    form = format_html(
        '<p>Stop receiving {}?</p><form method="post" action="{}">'
        '<input type="hidden" name="{}" value="{}"><button type="submit">Unsubscribe</button></form>',
        what,
        request.path,
        name,
        value,
    )
    return _page("Unsubscribe", form)
