"""The sandbox's own JSON control API under /_sandbox/: request log, faults, reset, health."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from providers.sandbox.receipts import RECEIPTS_KEY
from providers.sandbox.state import CONFIG_KEY, PROVIDERS, STATE_KEY, FaultValidationError


def _bad_request(error: str, field: str | None) -> web.Response:
    return web.json_response({"error": error, "field": field}, status=400)


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; an empty body counts as {}."""
    raw = await request.read()
    if not raw.strip():
        return {}
    payload = json.loads(raw)
    if not isinstance(payload, dict):
        raise ValueError("body must be a JSON object")
    return payload


async def list_requests(request: web.Request) -> web.Response:
    query = request.query
    accepted = query.get("accepted")
    if accepted not in (None, "true", "false"):
        return _bad_request("accepted must be true or false", "accepted")
    rows = request.app[STATE_KEY].find_requests(
        provider=query.get("provider"),
        to=query.get("to"),
        message_id=query.get("message_id"),
        accepted=None if accepted is None else accepted == "true",
    )
    return web.json_response({"count": len(rows), "requests": rows})


async def list_callbacks(request: web.Request) -> web.Response:
    """The newest finished callbacks (at most CALLBACK_LOG_LIMIT), oldest first, with the counters."""
    report = await request.app[RECEIPTS_KEY].report(records=True)
    summary, callbacks = report["summary"], report["callbacks"]
    return web.json_response(
        {
            "count": len(callbacks),
            "pending": summary["total"]["pending"],
            "summary": summary,
            "callbacks": callbacks,
        }
    )


async def callbacks_summary(request: web.Request) -> web.Response:
    """Counters per provider and in total, cheap at any volume: scheduled, posted_ok, attempts,
    failed_attempts, given_up, pending (scheduled = posted_ok + given_up + pending); the
    callbacks' latency; the pid of the process posting them."""
    report = await request.app[RECEIPTS_KEY].report(records=False)
    return web.json_response(report["summary"])


async def get_faults(request: web.Request) -> web.Response:
    faults = request.app[STATE_KEY].faults
    return web.json_response({name: settings.as_dict() for name, settings in faults.items()})


async def set_faults(request: web.Request) -> web.Response:
    try:
        changes = await _json_object(request)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return _bad_request(f"invalid JSON body: {exc}", None)
    provider = changes.pop("provider", None)
    if provider not in PROVIDERS:
        return _bad_request(f"provider must be one of {', '.join(PROVIDERS)}", "provider")
    state = request.app[STATE_KEY]
    try:
        state.faults[provider] = state.faults[provider].updated(changes)
    except FaultValidationError as exc:
        return _bad_request(str(exc), exc.field)
    request.app[RECEIPTS_KEY].faults_changed(state.faults)
    return web.json_response(state.faults[provider].as_dict())


async def reset(request: web.Request) -> web.Response:
    try:
        payload = await _json_object(request)
    except ValueError as exc:
        return _bad_request(f"invalid JSON body: {exc}", None)
    seed = payload.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        return _bad_request("seed must be an integer", "seed")
    state, receipts = request.app[STATE_KEY], request.app[RECEIPTS_KEY]
    state.reset(seed, reseed="seed" in payload)
    receipts.faults_changed(state.faults)
    # Answered once every callback planned before is cancelled (in the callback process too): a
    # receipt that fires after the reset would leak into the next test. It zeroes the callback
    # counters and log too.
    await receipts.reset()
    return web.json_response({"ok": True})


async def get_config(request: web.Request) -> web.Response:
    state, config = request.app[STATE_KEY], request.app[CONFIG_KEY]
    return web.json_response({"public_url": state.public_url or config.public_url})


async def set_config(request: web.Request) -> web.Response:
    """Account-level settings a provider's dashboard would hold: today the webhook base URL."""
    body = await _json_object(request)
    unknown = sorted(set(body) - {"public_url"})
    if unknown:
        return _bad_request(f"unknown field {unknown[0]!r}", unknown[0])
    public_url = body.get("public_url")
    if public_url is not None and not (isinstance(public_url, str) and public_url.startswith(("http://", "https://"))):
        return _bad_request("public_url must be an http(s) URL or null", "public_url")
    request.app[STATE_KEY].public_url = public_url
    return await get_config(request)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def register(app: web.Application) -> None:
    app.router.add_get("/_sandbox/requests", list_requests)
    app.router.add_get("/_sandbox/callbacks", list_callbacks)
    app.router.add_get("/_sandbox/callbacks/summary", callbacks_summary)
    app.router.add_get("/_sandbox/faults", get_faults)
    app.router.add_post("/_sandbox/faults", set_faults)
    app.router.add_post("/_sandbox/reset", reset)
    app.router.add_get("/_sandbox/config", get_config)
    app.router.add_post("/_sandbox/config", set_config)
    app.router.add_get("/_sandbox/healthz", healthz)
