"""The one accessor for the messaging layer's settings: the keys of settings.CONDUCTOR it owns,
merged over these defaults (messaging.checks rejects bad values; conductor_project.checks unknown keys)."""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    # Provider names per channel, in order. Dispatch uses the first; walking the route on
    # failure (fallback) comes with the circuit breakers.
    "ROUTES": {"sms": ["twilio", "vonage"], "whatsapp": ["twilio"], "email": ["mailgun", "smtp"]},
    # Per-priority overrides of messaging.routing.DEFAULT_RETRY_POLICIES (partial dicts).
    "RETRY_POLICIES": {},
    # Per-category overrides on top of the priority's policy, e.g. {"password_reset": {"ttl_seconds": 900}}.
    "CATEGORY_POLICIES": {},
    # How long a worker owns a message while it sends; must exceed the provider timeout.
    "DISPATCH_LEASE_SECONDS": 60.0,
    # A message whose worker died this many times goes to the DLQ instead of looping.
    "MAX_WORKER_LOSSES": 3,
    # Redis re-delivers tasks held past its visibility timeout, so countdowns stay short;
    # longer retry delays are stored in next_attempt_at and enqueued by the sweeper.
    "MAX_COUNTDOWN_SECONDS": 60.0,
    # An accepted message whose task was enqueued longer ago than this is enqueued again.
    "SWEEP_STALE_AFTER_SECONDS": {"critical": 15.0, "transactional": 60.0, "bulk": 600.0},
    "SWEEP_BATCH_SIZE": 2000,
    # Bulk messages are sent in batches: ids per dispatch_batch task (claimed, sent and recorded
    # together, a few statements per batch), and sends in flight at once within one worker process.
    # 500: 16 % more messages a second than 250 (bench/README.md, fourth session). A round is then
    # 5 waves of calls; however slow the provider, the round ends within its budget (45 s of the
    # 60 s lease): calls still in flight then are ambiguous, calls not yet made are not made.
    "BULK_BATCH_SIZE": 500,
    "BATCH_MAX_ITEMS": 1000,
    # Longest body per channel: Twilio's 1,600 characters for SMS, WhatsApp's 4,096.
    "BODY_MAX_LENGTH": {"sms": 1600, "whatsapp": 4096, "email": 262144},
    "METADATA_MAX_BYTES": 16384,
    # The largest API request body in bytes (past it: a JSON 413 naming the limit). A web thread
    # holds the request and its parsed objects in memory, so not a full batch at the longest body
    # (1,000 emails of 262,144 characters: ~1 GB): 64 MiB takes 1,000 messages of ~60 KB each.
    # 0: a full batch at the longest body (messaging.api.parsers.api_max_request_bytes).
    "API_MAX_REQUEST_BYTES": 64 * 1024 * 1024,
    # Deepest JSON nesting a request may have (metadata included): deeper is a 400 naming the field,
    # not a RecursionError somewhere downstream.
    "JSON_MAX_DEPTH": 64,
    # The longest ttl_seconds: 366 days (timedelta overflows past ~2.7e9 days; no message waits a year).
    "TTL_MAX_SECONDS": 366 * 24 * 3600,
    # A send_at at most this far in the past is sent at once (a client's clock a little behind, a
    # request retried); further back is a 400: a time that long gone is a client's mistake, and
    # sending it now could be as wrong as not sending it (docs/scheduling.md).
    "SEND_AT_PAST_TOLERANCE_SECONDS": 300.0,
    # Dead letters one API call replays at most; the response says how many matching remain.
    "REPLAY_API_MAX_ITEMS": 1000,
    # Receipts applied per batch (one transaction, a few statements per receipt state).
    "RECEIPT_APPLY_BATCH_SIZE": 1000,
    # A receipt for a message not yet recorded as dispatched (it overtook our own write) waits
    # this long for that write; then it is kept as unmatched (never_dispatched).
    "RECEIPT_HOLD_SECONDS": 600.0,
    # The sweeper publishes the receipt applier when a receipt has been due this long unapplied.
    "RECEIPT_SWEEP_AFTER_SECONDS": 5.0,
    # A dispatched message with no final receipt this long after dispatch is polled at its provider.
    "RECEIPT_TIMEOUT_SECONDS": {"sms": 600.0, "whatsapp": 600.0, "email": 600.0},
    # Messages with an ordering_key wait for the earlier ones with the same key. When an earlier
    # one is given up on (failed, expired, dead-lettered): "proceed" (the later ones go on; a
    # replay of it then arrives out of order) or "hold" (they wait until it is replayed and
    # dispatched, or cancelled: nothing arrives out of order, but nothing arrives at all until
    # an operator acts). docs/operations.md, "Ordering".
    "ORDERING_DEAD_PREDECESSOR": "proceed",
    # The stricter ordering mode per category ("delivered": wait for the earlier message's
    # receipt), e.g. {"order_updates": "delivered"}; a message's own ordering_mode wins.
    "CATEGORY_ORDERING": {},
    # In "delivered" mode, how long to wait for the earlier message's receipt before going on.
    "ORDERING_RECEIPT_TIMEOUT_SECONDS": 300.0,
    # Per-client limits (issue 20); an ApiClient's own field, when set, wins over these.
    # API requests per client, as DRF writes a rate ("100/s", "3000/min"); "none": no limit. A batch
    # request counts once: 100 batches a second is 100,000 messages a second, above any ingest.
    "API_RATE": "100/s",
    # Messages accepted per client and channel per UTC day, e.g. {"sms": 100000}; a channel not
    # named has no quota.
    "DAILY_QUOTA": {},
    # The share of a daily quota after which a warning is logged and counted (once a day).
    "QUOTA_WARNING_RATIO": 0.8,
    # The priorities a client may send; a client's allowed_priorities narrows (or widens) it.
    "ALLOWED_PRIORITIES": ["critical", "transactional", "bulk"],
    # Categories an opt-out without a scope (STOP, unsubscribe) leaves alone, for clients that set
    # none of their own (ApiClient.opt_out_exempt_categories), e.g. ["otp"]. Empty: STOP stops all.
    "OPT_OUT_EXEMPT_CATEGORIES": [],
    # The answer to an inbound HELP or INFO (messaging.suppressions.inbound): in Twilio's webhook
    # answer (TwiML), or a message sent through Conductor for Vonage. Carriers expect it to name
    # the sender and how to opt out. "" or "none": HELP is not answered (Twilio's own reply stands).
    "SMS_HELP_REPLY": "Conductor notifications. Reply STOP to unsubscribe, START to resubscribe. "
    "Msg&data rates may apply.",
    # WhatsApp's customer-service window (docs/whatsapp.md): a free-form (non-template) WhatsApp
    # message goes only within this many hours of the recipient's last message to us (Meta's rule,
    # Twilio error 63016 outside it); outside, it falls back or fails (outside_session_window).
    # 0: not enforced here (only for a sender exempt from the rule, e.g. a test double).
    "WHATSAPP_SESSION_WINDOW_HOURS": 24.0,
    # Email categories that carry List-Unsubscribe and one-click unsubscribe (RFC 8058) headers,
    # bulk-priority emails carrying them whatever their category; an unsubscribe from an email of
    # one of these categories covers that category only (docs/suppressions.md).
    "LIST_UNSUBSCRIBE_CATEGORIES": ["marketing", "newsletter"],
    # Bulk work is shared fairly between clients (messaging.fair): a bulk task claims the next
    # batch of due messages of its channel, an equal share per client with due work.
    "BULK_FAIR_SHARING": True,
    # Quiet hours (issue 23, messaging.quiet_hours, docs/quiet-hours.md): local windows in the
    # recipient's time zone in which messages wait, per category with "default" for the rest, e.g.
    # {"default": {"start": "21:00", "end": "08:00"}, "otp": None}; an ApiClient's own quiet_hours
    # replaces it for that client. {}: none.
    "QUIET_HOURS": {},
    # Priorities quiet hours leave alone, unless a window names its own "exempt_priorities".
    "QUIET_HOURS_EXEMPT_PRIORITIES": ["critical"],
    # Receipt-aware routing (issue 24, docs/routing.md): the share of bulk and transactional
    # messages that still go first to a degraded provider, so its receipts can show it has
    # recovered (critical never: messaging.route_health.probe_share_for). 0 to 1.
    "ROUTE_PROBE_SHARE": 0.05,
    # Status callbacks to clients (issue 21, messaging.callbacks, docs/callbacks.md).
    # One request's limit: connect, send and read the answer.
    "CALLBACK_TIMEOUT_SECONDS": 10.0,
    # A callback is retried (full-jitter exponential backoff from BASE, each wait at most MAX)
    # until it is this old; then it is a dead letter of its own kind.
    "CALLBACK_RETRY_WINDOW_SECONDS": 24 * 3600.0,
    "CALLBACK_BACKOFF_BASE_SECONDS": 5.0,
    "CALLBACK_BACKOFF_MAX_SECONDS": 3600.0,
    # Requests in flight at once: per endpoint (one slow endpoint holds no more than this) and in
    # all, per delivering process.
    "CALLBACK_CONCURRENCY_PER_ENDPOINT": 16,
    "CALLBACK_CONCURRENCY": 256,
    # Callbacks to private, loopback and link-local addresses (messaging.callbacks.destinations):
    # refused unless set (the project's settings set it outside production).
    "CALLBACK_ALLOW_PRIVATE_NETWORKS": False,
    # How long a delivering worker owns a claimed callback; must exceed the timeout.
    "CALLBACK_LEASE_SECONDS": 60.0,
    # After a secret is rotated the old one still signs (beside the new) this long.
    "CALLBACK_SECRET_OVERLAP_SECONDS": 24 * 3600.0,
    # Fallback on silence (issue 24, messaging.silence, docs/silence-fallback.md): per category, a
    # dispatched message with no final receipt after_seconds after dispatch, or reported
    # undelivered, is sent once more through its route's next provider or channel, e.g.
    # {"otp": {"after_seconds": 60}}. It can deliver twice (the first receipt may only be late):
    # only the categories named here, where a second copy is better than none. {}: off.
    "SILENCE_FALLBACK": {},
}


def messaging_setting(name: str) -> Any:
    """A setting of this layer: the project's CONDUCTOR[name] over the default."""
    if name not in DEFAULTS:
        raise KeyError(f"unknown messaging setting {name!r}")
    configured = getattr(settings, "CONDUCTOR", {})
    return configured.get(name, DEFAULTS[name])
