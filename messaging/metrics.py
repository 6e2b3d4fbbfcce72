"""Event metrics recorded where things happen (the transition service, provider attempts).

These are counters and histograms: only the process that sees an event can record it, so every
web and worker process writes them and /metrics sums them. With PROMETHEUS_MULTIPROC_DIR set in
every process's environment (make run, compose and the test stack set it) prometheus-client keeps
them in memory-mapped files in that directory and the scrape adds up every process's file,
including processes that have exited (a counter must not drop when a pool child is replaced).
Counts of current state (messages by state, dead letters, queue depth, circuits) are not here:
they are read from PostgreSQL, the broker and Redis at scrape time, see conductor_project/metrics.py.
"""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Counter, Histogram, disable_created_metrics

# The multiprocess collector never reports _created series; without it the same process would.
disable_created_metrics()

# One set of boundaries for a 2FA code (tenths of a second) and a bulk campaign (hours behind):
# the same buckets on every latency family so panels and quantiles compare.
LATENCY_BUCKETS_SECONDS: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    14400.0,
)

DISPATCH_LATENCY = Histogram(
    "conductor_dispatch_latency_seconds",
    "Accepted to dispatched (the provider took it), by channel and priority.",
    ["channel", "priority"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
DELIVERY_LATENCY = Histogram(
    "conductor_delivery_latency_seconds",
    "Accepted to delivered (the provider's receipt said so), by channel and priority.",
    ["channel", "priority"],
    buckets=LATENCY_BUCKETS_SECONDS,
)
PROVIDER_ATTEMPTS = Counter(
    "conductor_provider_attempts",
    "Provider calls (sends and status look-ups) that ended, by channel, provider and outcome.",
    ["channel", "provider", "outcome"],
)
PROVIDER_ERRORS = Counter(
    "conductor_provider_errors",
    "Provider calls that ended in an error, by channel, provider and error type.",
    ["channel", "provider", "error_type"],
)


def latency_observe(
    *, to_state: str, channel: str, priority: str, accepted_at: datetime, at: datetime, from_state: str = ""
) -> None:
    """Record accepted->dispatched or accepted->delivered for a transition that was applied.

    A message read without a delivered receipt before it counts as delivered when read.
    """
    if to_state == "read" and from_state not in ("delivered", ""):
        to_state = "delivered"
    family = {"dispatched": DISPATCH_LATENCY, "delivered": DELIVERY_LATENCY}.get(to_state)
    if family is None:
        return
    family.labels(channel=channel, priority=priority).observe(max(0.0, (at - accepted_at).total_seconds()))


def attempt_count(*, channel: str, provider: str, outcome: str, error_type: str = "") -> None:
    """Record a provider call that ended; an error also counts under its type."""
    PROVIDER_ATTEMPTS.labels(channel=channel, provider=provider, outcome=outcome).inc()
    if error_type:
        PROVIDER_ERRORS.labels(channel=channel, provider=provider, error_type=error_type).inc()


# Per-client limits (messaging.limits); client names are few (one per API client), not per message.
QUOTA_WARNINGS = Counter(
    "conductor_quota_warnings",
    "Clients that crossed QUOTA_WARNING_RATIO of a daily quota (once per client, channel and day).",
    ["client", "channel"],
)
QUOTA_REFUSED = Counter(
    "conductor_quota_refused",
    "Messages refused because the client's daily quota for the channel was spent.",
    ["client", "channel"],
)
API_THROTTLED = Counter(
    "conductor_api_throttled",
    "API requests refused with 429 because the client exceeded its request rate.",
    ["client"],
)


# The clients' suppression lists (messaging.suppressions): what was added, and the messages kept
# from a provider by one (stage: acceptance, or dispatch: before a provider hop).
SUPPRESSIONS_ADDED = Counter(
    "conductor_suppressions_added",
    "Suppressions added to clients' lists, by channel and reason (stop_keyword, hard_bounce, ...).",
    ["channel", "reason"],
)
MESSAGES_SUPPRESSED = Counter(
    "conductor_messages_suppressed",
    "Messages (or fallback hops) not handed to any provider because the address is suppressed.",
    ["channel", "stage"],
)


# Messages recipients sent to our numbers (inbound STOP, START, HELP, other), by what they did
# (messaging.models.InboundAction: suppressed, lifted, help_replied, unattributed, none, ...).
INBOUND_MESSAGES = Counter(
    "conductor_inbound_messages",
    "Inbound messages taken (retried webhooks once), by provider, channel and action.",
    ["provider", "channel", "action"],
)


def suppression_added_count(*, channel: str, reason: str) -> None:
    SUPPRESSIONS_ADDED.labels(channel=channel, reason=reason).inc()


def inbound_message_count(*, provider: str, channel: str, action: str) -> None:
    INBOUND_MESSAGES.labels(provider=provider, channel=channel, action=action).inc()


def messages_suppressed_count(*, channel: str, stage: str, count: int = 1) -> None:
    if count:
        MESSAGES_SUPPRESSED.labels(channel=channel, stage=stage).inc(count)


# Status callbacks to clients (messaging.callbacks.delivery). No endpoint label: endpoints are as
# many as the clients' callback URLs; the backlog per endpoint is read at scrape time instead.
CALLBACKS_SENT = Counter(
    "conductor_callbacks_sent",
    "Callback attempts that ended, by outcome (delivered, retry: tried again later, dead_lettered: given up).",
    ["outcome"],
)
CALLBACKS_FAILED = Counter(
    "conductor_callbacks_failed",
    "Callback attempts that failed, by reason (timeout, connection, http_5xx, http_4xx, http_429, http_3xx), "
    "and callbacks held back unattempted because their endpoint's circuit was open (circuit_open).",
    ["reason"],
)
CALLBACK_LATENCY = Histogram(
    "conductor_callback_latency_seconds",
    "From the event a callback reports to the client's endpoint accepting it (retries included).",
    buckets=LATENCY_BUCKETS_SECONDS,
)
CALLBACK_REQUEST_SECONDS = Histogram(
    "conductor_callback_request_seconds",
    "One callback request: from sending it to the endpoint's answer (or the timeout).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
_CALLBACK_OUTCOMES = {"delivered": "delivered", "retry": "retry", "final": "dead_lettered"}


def callback_attempt_observe(*, outcome: str, reason: str, latency_s: float) -> None:
    """One callback attempt ended (outcome: delivered, retry or final; reason: why it failed)."""
    CALLBACKS_SENT.labels(outcome=_CALLBACK_OUTCOMES[outcome]).inc()
    if reason:
        CALLBACKS_FAILED.labels(reason=reason).inc()
    CALLBACK_REQUEST_SECONDS.observe(latency_s)


def callback_delivered_observe(*, occurred_at: datetime, at: datetime) -> None:
    CALLBACK_LATENCY.observe(max(0.0, (at - occurred_at).total_seconds()))


def callbacks_held_observe(count: int) -> None:
    """Callbacks claimed while their endpoint's circuit was open: back to wait, not attempted."""
    CALLBACKS_FAILED.labels(reason="circuit_open").inc(count)


# Fallbacks on silence (messaging.silence): second copies sent through the route's next hop, by
# the message's category, the provider of the copy, why (silence: no final receipt in time;
# undelivered: reported so) and what the copy's send came to (accepted, or the error type).
SILENCE_FALLBACKS = Counter(
    "conductor_silence_fallbacks",
    "Second copies of opted-in messages sent after no final receipt in time or an undelivered receipt.",
    ["category", "provider", "reason", "outcome"],
)


def silence_fallback_count(*, category: str, provider: str, reason: str, outcome: str) -> None:
    SILENCE_FALLBACKS.labels(category=category, provider=provider, reason=reason, outcome=outcome).inc()
