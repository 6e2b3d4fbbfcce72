"""Messages, their dispatch attempts and lifecycle events, and the API clients that own them."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Q

from messaging.quiet_hours import QuietHoursError, parse_config
from messaging.routing import Channel, Priority
from messaging.states import MessageState
from providers.types import ERROR_TYPE_MEANINGS, ErrorType  # noqa: F401  (the vocabulary of its error fields)


def validate_api_rate(value: str) -> None:
    """A rate as DRF's SimpleRateThrottle parses it (<count>/<s|m|h|d...>), or 'none'."""
    if value in ("", "none"):
        return
    count, _, period = value.partition("/")
    if not (count.isdigit() and int(count) > 0 and period[:1] in ("s", "m", "h", "d")):
        raise ValidationError(f"{value!r} is not a rate: write e.g. 100/s, 3000/min, 'none'.")


def validate_priorities(value: Any) -> None:
    if not isinstance(value, list) or not set(value) <= set(Priority.values):
        raise ValidationError(f"Give a list of priorities among {', '.join(Priority.values)}.")


class ApiClient(models.Model):
    """A sender holding API keys; it sees and replays only its own messages."""

    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # Per-client limits (issue 20); blank: the settings' default (messaging.conf: API_RATE,
    # DAILY_QUOTA, ALLOWED_PRIORITIES). Read through messaging.limits, never directly.
    api_rate = models.CharField(
        max_length=32,
        blank=True,
        default="",
        validators=[validate_api_rate],
        help_text="API requests allowed, as DRF writes a rate: 100/s, 3000/min, 'none' for no limit. "
        "Blank: the API_RATE setting.",
    )
    sms_daily_quota = models.PositiveIntegerField(
        null=True, blank=True, help_text="SMS messages accepted per UTC day. Blank: the DAILY_QUOTA setting."
    )
    whatsapp_daily_quota = models.PositiveIntegerField(
        null=True, blank=True, help_text="WhatsApp messages accepted per UTC day. Blank: the DAILY_QUOTA setting."
    )
    email_daily_quota = models.PositiveIntegerField(
        null=True, blank=True, help_text="Emails accepted per UTC day. Blank: the DAILY_QUOTA setting."
    )
    opt_out_exempt_categories = models.JSONField(
        default=list,
        blank=True,
        help_text='Categories an opt-out that names no scope (STOP, unsubscribe) does not stop, e.g. ["otp"]: '
        "messages the recipient asked for themselves. Empty: the OPT_OUT_EXEMPT_CATEGORIES setting. "
        "A suppression of an address that cannot receive (hard bounce, invalid number) stops them too.",
    )
    allowed_priorities = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_priorities],
        help_text='Priorities this client may send, e.g. ["transactional", "bulk"]. '
        "Empty: the ALLOWED_PRIORITIES setting.",
    )
    # Issue 23: quiet hours in the recipient's time zone (messaging.quiet_hours); null: the
    # QUIET_HOURS setting. Read through messaging.quiet_hours, never directly.
    quiet_hours = models.JSONField(
        null=True,
        blank=True,
        help_text="Local hours in which this client's messages wait, per category, e.g. "
        '{"default": {"start": "21:00", "end": "08:00"}, "marketing": {"start": "20:00", "end": "09:00"}}. '
        "Null: the QUIET_HOURS setting.",
    )

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # Here rather than as a field validator: a validator is part of the field's definition, so a
        # migration. The admin and full_clean() call it; a configuration that cannot be read would
        # silently keep no quiet hours at dispatch.
        super().clean()
        if self.quiet_hours is not None:
            try:
                validate_quiet_hours(self.quiet_hours)
            except ValidationError as exc:
                raise ValidationError({"quiet_hours": exc.messages}) from None


def validate_quiet_hours(value: Any) -> None:
    """An ApiClient.quiet_hours value: as the QUIET_HOURS setting (messaging.quiet_hours.parse_config)."""
    try:
        parse_config(value)
    except QuietHoursError as exc:
        raise ValidationError(str(exc)) from None


class ApiKey(models.Model):
    """An API key, stored as a SHA-256 hash: keys are 256-bit random, so a slow hash adds nothing."""

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="keys")
    prefix = models.CharField(max_length=16, help_text="First characters of the key, to recognise it.")
    key_hash = models.CharField(max_length=64, unique=True)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.client})"


class OrderingMode(models.TextChoices):
    DISPATCHED = "dispatched", "after the previous one is dispatched"
    DELIVERED = "delivered", "after the previous one is delivered (or a timeout)"


class OrderingKey(models.Model):
    """The last sequence number given out per client and ordering key.

    Incremented by an upsert inside the transaction that stores the message, so concurrent
    requests for one key queue on this row and a rolled-back request gives its number back.
    """

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="ordering_keys")
    key = models.CharField(max_length=255)
    last_sequence = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["client", "key"], name="ordering_key_unique_per_client")]

    def __str__(self) -> str:
        return f"{self.client} {self.key}: {self.last_sequence}"


class CallbackEvent(models.TextChoices):
    """What a client's callback endpoint can subscribe to: each state entered, and two events that
    are not states. The payload's `type` is `message.<value>` (messaging.callbacks)."""

    ACCEPTED = "accepted"
    DISPATCHED = "dispatched"
    DELIVERED = "delivered"
    READ = "read"
    UNDELIVERED = "undelivered"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    DEAD_LETTERED = "dead_lettered"
    ATTEMPT_FAILED = "attempt.failed"


def validate_callback_events(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or not set(value) <= set(CallbackEvent.values):
        raise ValidationError(f"Give a list of events among {', '.join(CallbackEvent.values)}.")


class CallbackEndpoint(models.Model):
    """A client's URL for status callbacks (issue 21): the events it wants, signed with its secrets.

    A message naming its own `callback_url` is reported to the client's endpoint with that URL
    (registered on first use, `per_message`), and to no other endpoint of the client.
    """

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="callback_endpoints")
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=200, blank=True, default="")
    # Empty: every event.
    events = models.JSONField(default=list, blank=True, validators=[validate_callback_events])
    enabled = models.BooleanField(default=True)
    # Registered for a message's own callback_url rather than through the endpoints API.
    per_message = models.BooleanField(default=False)
    # Standard Webhooks secrets ("whsec_" + base64), newest first: [{"secret", "created_at",
    # "expires_at"}]; every one not expired signs, so a rotation has an overlap. HMAC needs the
    # secret itself: stored as given, unlike API keys (docs/callbacks.md says so).
    secrets = models.JSONField(default=list)
    # The first failure of the current run of failures (cleared by a success): past
    # CALLBACK_DISABLE_AFTER_SECONDS the endpoint is disabled and an alert raised (reconciliation).
    failing_since = models.DateTimeField(null=True, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["client", "url"], name="callback_endpoint_unique_url_per_client"),
        ]

    def __str__(self) -> str:
        return f"{self.client}: {self.url}"


# A countdown task may fire a little before next_attempt_at by the database's clock.
EARLY_TOLERANCE = timedelta(seconds=1)


def unleased(now: datetime) -> Q:
    """No worker holds the message: never leased, or its lease ran out."""
    return Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lt=now)


def due(now: datetime) -> Q:
    """No retry scheduled, or its time has come."""
    return Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now)


def scheduled_time_come(now: datetime) -> Q:
    """Not a scheduled send, or its send_at has come: no tolerance, a scheduled message is never
    sent early (EARLY_TOLERANCE is for retry countdowns, docs/scheduling.md)."""
    return Q(send_at__isnull=True) | Q(send_at__lte=now)


def scheduled_waiting(now: datetime) -> Q:
    """A scheduled send still waiting for its time: accepted, send_at to come."""
    return Q(state=MessageState.ACCEPTED, send_at__gt=now)


def claimable(now: datetime) -> Q:
    """What a dispatch claim asks of a message: accepted, unleased and due (a little early is
    fine: EARLY_TOLERANCE, but never before its send_at). Message.is_claimable is the same test
    on a loaded row."""
    return Q(state=MessageState.ACCEPTED) & unleased(now) & due(now + EARLY_TOLERANCE) & scheduled_time_come(now)


class MessageQuerySet(models.QuerySet):
    def unleased(self, now: datetime) -> MessageQuerySet:
        return self.filter(unleased(now))

    def due(self, now: datetime) -> MessageQuerySet:
        return self.filter(due(now))

    def claimable(self, now: datetime) -> MessageQuerySet:
        return self.filter(claimable(now))


class Message(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: (client, created_at) and (client, idempotency_key) lead with it, and
    # each index is written again by every state change of every message.
    client = models.ForeignKey(ApiClient, on_delete=models.PROTECT, related_name="messages", db_index=False)
    channel = models.CharField(max_length=16, choices=Channel.choices)
    to = models.CharField(max_length=320)
    body = models.TextField()
    subject = models.CharField(max_length=998, blank=True, default="")
    priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.TRANSACTIONAL)
    category = models.CharField(max_length=100, blank=True, default="")
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    # SHA-256 of the normalised request: the same key with another payload is a 422.
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")
    ordering_key = models.CharField(max_length=255, null=True, blank=True)
    # Per client and ordering key, 1, 2, 3 ... in order of acceptance (gap-free); None without a key.
    sequence = models.PositiveBigIntegerField(null=True, blank=True)
    # What an earlier message with the same key must reach before this one is sent: dispatched
    # (the provider has it, or it is final) or, stricter, delivered (its receipt, or a timeout).
    ordering_mode = models.CharField(max_length=16, choices=OrderingMode.choices, blank=True, default="")
    # While held back by an earlier message with the same key: that message (the closest one).
    waiting_for = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="waiters", db_index=True
    )
    waiting_since = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()
    # When the client asked it to be sent (scheduled send, issue 23): never dispatched before; the
    # time itself lives on in next_attempt_at until the first claim (null: at once).
    send_at = models.DateTimeField(null=True, blank=True)
    # The recipient's IANA time zone for quiet hours, when the client gave it (else from the number).
    recipient_timezone = models.CharField(max_length=64, blank=True, default="")
    # A WhatsApp template (Twilio Content SID, HX...) and its variables: sent instead of the body
    # outside the 24-hour session window (messaging.whatsapp_session).
    template = models.CharField(max_length=64, blank=True, default="")
    template_variables = models.JSONField(default=dict, blank=True)
    # Fallback on silence (issue 24): when a copy went through the route's next provider or
    # channel because the first send had no final receipt in time, or was undelivered.
    silence_fallback_at = models.DateTimeField(null=True, blank=True)
    # The sender gave expires_at or ttl_seconds: a replay never moves that deadline unless forced.
    deadline_from_sender = models.BooleanField(default=False)
    fallback_channels = models.JSONField(default=list, blank=True)
    fallback_to = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    # Status callbacks (issue 21): the endpoint of the message's own callback_url (None: the
    # client's endpoints), the events it asked for (None: the endpoint's), and the number of the
    # message's last event; each callback carries the next one (messaging.callbacks).
    callback_endpoint = models.ForeignKey(
        CallbackEndpoint, on_delete=models.SET_NULL, null=True, blank=True, db_index=False, related_name="+"
    )
    callback_events = models.JSONField(null=True, blank=True, validators=[validate_callback_events])
    event_sequence = models.PositiveIntegerField(default=0)

    state = models.CharField(max_length=16, choices=MessageState.choices, default=MessageState.ACCEPTED)
    # The database is the queue of record: attempts, next-attempt time and the lease live here.
    send_generation = models.PositiveIntegerField(default=1)
    # Recorded hops (provider calls, look-ups, circuit-open skips) and, separately, the rounds
    # through the whole route that failed: the retry budget and backoff count rounds.
    attempt_count = models.PositiveIntegerField(default=0)
    failed_rounds = models.PositiveIntegerField(default=0)
    worker_loss_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Set when a send's outcome is unknown: ask the provider before any resend.
    needs_provider_lookup = models.BooleanField(default=False)
    provider = models.CharField(max_length=32, blank=True, default="")
    provider_message_id = models.CharField(max_length=128, blank=True, default="")
    last_error_type = models.CharField(max_length=32, blank=True, default="", choices=ErrorType.choices)
    last_error_code = models.CharField(max_length=64, blank=True, default="")
    last_error_message = models.TextField(blank=True, default="")
    # Receipt follow-up: when the provider was last asked for an overdue receipt, and when we
    # stopped waiting for one (past the provider's receipt horizon: delivery unknown, counted).
    receipt_polled_at = models.DateTimeField(null=True, blank=True)
    receipt_unknown_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField()
    updated_at = models.DateTimeField(auto_now=True)
    accepted_at = models.DateTimeField(null=True, blank=True)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)
    undelivered_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    dead_lettered_at = models.DateTimeField(null=True, blank=True)

    objects = MessageQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["client", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="message_unique_idempotency_key_per_client",
            ),
            # Gap-free sequences cannot repeat; the index also finds a message's predecessors.
            models.UniqueConstraint(
                fields=["client", "ordering_key", "sequence"],
                condition=Q(sequence__isnull=False),
                name="message_unique_sequence_per_key",
            ),
        ]
        indexes = [
            models.Index(fields=["client", "-created_at"], name="message_client_created"),
            models.Index(fields=["state", "next_attempt_at"], name="message_state_next_attempt"),
            # The sweeper's two questions, asked every few seconds: a backlog of accepted rows
            # whose tasks are queued is in these indexes, but outside the ranges it reads.
            models.Index(
                fields=["priority", "enqueued_at", "next_attempt_at"],
                condition=Q(state="accepted"),
                name="message_accepted_enqueued",
            ),
            # Its condition names expires_at so that no other accepted-row query can use it (with stale
            # statistics the planner would take any index whose condition fits as a cheap one).
            models.Index(
                fields=["expires_at"],
                condition=Q(state="accepted", expires_at__isnull=False),
                name="message_accepted_expiry",
            ),
            # The fair bulk claim (messaging.fair): which clients have bulk work on a channel (a
            # loose index scan), then each client's oldest, a share per client.
            models.Index(
                fields=["channel", "client", "created_at"],
                condition=Q(state="accepted", priority="bulk", sequence__isnull=True),
                name="message_bulk_fair",
            ),
            models.Index(fields=["provider", "provider_message_id"], name="message_provider_ref"),
            # Who sent last to a number on a channel: the client an inbound STOP belongs to
            # (messaging.suppressions.inbound). Only dispatched rows; built concurrently (0017).
            models.Index(
                fields=["channel", "to", "-dispatched_at"],
                condition=Q(dispatched_at__isnull=False),
                name="message_recipient_dispatched",
            ),
            # Receipt polling, reconciliation and the anomaly buckets read messages by dispatch time.
            models.Index(fields=["dispatched_at"], name="message_dispatched"),
            models.Index(fields=["dispatched_at"], condition=Q(state="dispatched"), name="message_awaiting_receipt"),
            # /metrics counts messages by these three on every scrape: an index-only scan, not the table.
            models.Index(fields=["channel", "provider", "state"], name="message_route_state"),
            models.Index(
                fields=["channel", "provider"],
                condition=Q(state="dispatched", receipt_unknown_at__isnull=False),
                name="message_delivery_unknown",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.id} ({self.state})"

    def is_unleased(self, now: datetime) -> bool:
        """models.unleased on a loaded row."""
        return self.lease_expires_at is None or self.lease_expires_at < now

    def is_claimable(self, now: datetime) -> bool:
        """models.claimable on a loaded row (the bulk claim checks rows it has locked by key)."""
        return (
            self.state == MessageState.ACCEPTED
            and self.is_unleased(now)
            and (self.next_attempt_at is None or self.next_attempt_at <= now + EARLY_TOLERANCE)
            and (self.send_at is None or self.send_at <= now)
        )

    @property
    def send_token(self) -> str:
        """The idempotency token every retry of this send generation carries to the provider."""
        return f"{self.id}.{self.send_generation}"


class AttemptOutcome(models.TextChoices):
    IN_PROGRESS = "in_progress"
    ACCEPTED = "accepted"
    FOUND_AT_PROVIDER = "found_at_provider"
    NOT_FOUND_AT_PROVIDER = "not_found_at_provider"
    SKIPPED = "skipped"
    TRANSIENT_ERROR = "transient_error"
    PERMANENT_ERROR = "permanent_error"
    AMBIGUOUS = "ambiguous"
    WORKER_LOST = "worker_lost"


# Outcomes after which nobody knows whether the provider took the message: ask it before resending.
UNKNOWN_OUTCOMES = (AttemptOutcome.AMBIGUOUS, AttemptOutcome.WORKER_LOST)


class DispatchAttempt(models.Model):
    """One try at handing a message to a provider (or at finding out whether it already has it)."""

    # Indexed by attempt_message_outcome, which leads with it (a second index would be written twice per attempt).
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="attempts", db_index=False)
    number = models.PositiveIntegerField()
    send_generation = models.PositiveIntegerField(default=1)
    provider = models.CharField(max_length=32)
    channel = models.CharField(max_length=16, blank=True, default="")
    # Why this hop: the route's first provider, a fallback after another's failure, a look-up...
    note = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    outcome = models.CharField(max_length=24, choices=AttemptOutcome.choices, default=AttemptOutcome.IN_PROGRESS)
    error_type = models.CharField(max_length=32, blank=True, default="", choices=ErrorType.choices)
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    provider_message_id = models.CharField(max_length=128, blank=True, default="")

    class Meta:
        ordering = ["message", "number", "id"]
        indexes = [
            models.Index(fields=["message", "outcome"], name="attempt_message_outcome"),
            # The anomaly buckets count the last minutes' calls every minute, not the whole table.
            models.Index(fields=["ended_at"], name="attempt_ended"),
        ]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.message_id} via {self.provider}: {self.outcome}"


class EventSource(models.TextChoices):
    API = "api"
    WORKER = "worker"
    SWEEPER = "sweeper"
    WEBHOOK = "webhook"
    POLL = "poll"
    ADMIN = "admin"
    COMMAND = "command"
    # The fallback on silence (messaging.silence): a second copy through the route's next hop.
    FALLBACK = "fallback"


class MessageEvent(models.Model):
    """A requested state change, applied or refused; the message's timeline."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="events")
    created_at = models.DateTimeField()
    source = models.CharField(max_length=16, choices=EventSource.choices)
    from_state = models.CharField(max_length=16, blank=True, default="")
    to_state = models.CharField(max_length=16, choices=MessageState.choices)
    applied = models.BooleanField(default=True)
    detail = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["message", "created_at", "id"]

    def __str__(self) -> str:
        verb = "->" if self.applied else "-/>"
        return f"{self.message_id}: {self.from_state} {verb} {self.to_state}"


class DeadLetterKind(models.TextChoices):
    MESSAGE = "message"  # the message itself was given up on
    CALLBACK = "callback"  # a status callback to its client was given up on (issue 21)


class DeadLetter(models.Model):
    """A message given up on before it reached its recipient: retries spent, refused for good,
    past its deadline, or its worker kept dying. Parked by the transition service when the message
    enters failed, expired or dead_lettered, with everything an operator needs to decide and to
    replay; kept for the retention of its priority and category (reconciliation.retention).

    Of kind `callback`: a status callback to the client given up on (messaging.callbacks.dead_letters);
    `payload` is the callback's body, `attempts` its attempt log, `state` its message's state then,
    and the message's channel, priority and category (the retention and filters of messages apply).
    """

    kind = models.CharField(max_length=16, choices=DeadLetterKind.choices, default=DeadLetterKind.MESSAGE)
    callback = models.ForeignKey(
        "Callback", on_delete=models.CASCADE, null=True, blank=True, related_name="dead_letters"
    )
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="dead_letters")
    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="dead_letters")
    send_generation = models.PositiveIntegerField(help_text="The send generation that was given up on.")
    # The message's state when parked: failed, expired or dead_lettered.
    state = models.CharField(max_length=16, choices=MessageState.choices)
    channel = models.CharField(max_length=16, choices=Channel.choices)
    priority = models.CharField(max_length=16, choices=Priority.choices)
    category = models.CharField(max_length=100, blank=True, default="")
    provider = models.CharField(max_length=32, blank=True, default="", help_text="The last provider called.")
    error_type = models.CharField(max_length=32, choices=ErrorType.choices)
    error_code = models.CharField(max_length=64, blank=True, default="")
    error_message = models.TextField(blank=True, default="")
    reason = models.TextField(blank=True, default="", help_text="Why it was given up on.")
    # The last send may have reached its provider (timeout, worker lost): a replay asks first.
    unknown_outcome = models.BooleanField(default=False)
    payload = models.JSONField(encoder=DjangoJSONEncoder, help_text="The message as it was accepted.")
    attempts = models.JSONField(encoder=DjangoJSONEncoder, default=list, help_text="Every attempt until parked.")
    created_at = models.DateTimeField(help_text="When it was parked.")

    replayed_at = models.DateTimeField(null=True, blank=True)
    replayed_by = models.CharField(max_length=150, blank=True, default="")
    replayed_via = models.CharField(max_length=16, blank=True, default="", choices=EventSource.choices)
    # One id per replay operation: the dead letters one command, API call or admin action replayed.
    replay_id = models.UUIDField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["message", "send_generation"],
                condition=Q(kind="message"),
                name="dead_letter_once_per_generation",
            ),
            # A callback is parked again only after a replay of it.
            models.UniqueConstraint(
                fields=["callback"],
                condition=Q(kind="callback", replayed_at__isnull=True),
                name="dead_letter_callback_once_parked",
            ),
            models.CheckConstraint(
                condition=Q(kind="message", callback__isnull=True) | Q(kind="callback", callback__isnull=False),
                name="dead_letter_kind_callback",
            ),
        ]
        indexes = [
            models.Index(fields=["client", "-created_at"], name="dead_letter_client_created"),
            models.Index(fields=["created_at"], name="dead_letter_created"),
            models.Index(fields=["replay_id"], name="dead_letter_replay"),
        ]
        permissions = [("replay_deadletter", "Can replay dead letters")]

    def __str__(self) -> str:
        if self.kind == DeadLetterKind.CALLBACK:
            return f"dead letter {self.pk}: callback {self.callback_id} of {self.message_id} ({self.error_type})"
        return f"dead letter {self.pk}: {self.channel} {self.message_id} ({self.error_type})"

    @property
    def is_parked(self) -> bool:
        """Still waiting in the queue (not replayed)."""
        return self.replayed_at is None


class UnmatchedReason(models.TextChoices):
    """Why a stored receipt changed nothing: it does not stand for a send we made."""

    NO_MESSAGE = "no_message"  # it names no message we know
    NO_ATTEMPT = "no_attempt"  # the message was never handed to that provider
    ID_MISMATCH = "id_mismatch"  # that provider gave the message another id
    NEVER_DISPATCHED = "never_dispatched"  # the message stayed accepted for the whole hold


class Receipt(models.Model):
    """A status report from a provider, kept whether or not it changed the message.

    Stored by the webhook before it answers and applied to messages later, in batches
    (messaging.receipts): a row with no `processed_at` is still to be applied, from `due_at` on.
    """

    provider = models.CharField(max_length=32)
    # Deduplicates re-sent callbacks; synthesised from message id and status where the provider has none.
    event_id = models.CharField(max_length=200)
    # Set when the receipt is applied and matches a send of ours; `message_ref` is what it claimed.
    message = models.ForeignKey(Message, on_delete=models.CASCADE, null=True, blank=True, related_name="receipts")
    message_ref = models.UUIDField(null=True, blank=True)
    provider_message_id = models.CharField(max_length=128, blank=True, default="")
    provider_status = models.CharField(max_length=64)
    mapped_state = models.CharField(max_length=16, blank=True, default="")
    error_code = models.CharField(max_length=64, blank=True, default="")
    applied = models.BooleanField(default=False)
    source = models.CharField(max_length=16, default="webhook")
    received_at = models.DateTimeField()
    due_at = models.DateTimeField(null=True, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    # Times it waited for its message to be dispatched (a receipt can overtake our own write).
    deferrals = models.PositiveSmallIntegerField(default=0)
    unmatched_reason = models.CharField(max_length=16, blank=True, default="", choices=UnmatchedReason.choices)
    payload = models.JSONField(default=dict)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "event_id"], name="receipt_unique_event_per_provider"),
        ]
        indexes = [
            models.Index(fields=["provider", "provider_message_id"], name="receipt_provider_ref"),
            models.Index(fields=["message", "received_at"], name="receipt_message_time"),
            # The apply batches read only the pending rows: a small index however many are kept.
            models.Index(
                fields=["due_at", "id"], name="receipt_pending", condition=models.Q(processed_at__isnull=True)
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider} {self.provider_status} for {self.provider_message_id}"


class CallbackState(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"


class Callback(models.Model):
    """The outbox: one status callback to send to one endpoint, written in the transaction of the
    event it reports, so that a crash between the two cannot lose it.

    Sent by messaging.callbacks with retries; per message and endpoint in `sequence` order (a
    callback waits while an earlier one of its message to its endpoint is pending). `webhook_id`
    is the Standard Webhooks `webhook-id`, the same on every retry so receivers can de-duplicate.
    """

    id = models.BigAutoField(primary_key=True)
    webhook_id = models.CharField(max_length=40)
    # No index of its own: the claim's "is an earlier one pending" must use the unique index that
    # leads with the message (with an endpoint index to choose from, and no statistics yet on a
    # new table, PostgreSQL took it and a claim cost 6 s instead of 18 ms at 6,000 rows).
    endpoint = models.ForeignKey(CallbackEndpoint, on_delete=models.CASCADE, related_name="callbacks", db_index=False)
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="callbacks", db_index=False)
    event = models.CharField(max_length=16, choices=CallbackEvent.choices)
    # The message's event number (Message.event_sequence) and when the event happened.
    sequence = models.PositiveIntegerField()
    occurred_at = models.DateTimeField()
    payload = models.JSONField(encoder=DjangoJSONEncoder)
    state = models.CharField(max_length=16, choices=CallbackState.choices, default=CallbackState.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    # Each attempt: {"at", "status" (HTTP status or null), "error", "latency_ms"}.
    attempt_log = models.JSONField(default=list, encoder=DjangoJSONEncoder)
    next_attempt_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()
    # Retries stop CALLBACK_RETRY_WINDOW_SECONDS after this, or after created_at when None: a
    # replay (messaging.replay) sets it to the replay's time, so the replayed one gets a full window.
    retry_from = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    dead_lettered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")

    class Meta:
        constraints = [
            # Also the index that finds a message's callbacks and an earlier pending one.
            models.UniqueConstraint(
                fields=["message", "endpoint", "sequence"], name="callback_unique_sequence_per_endpoint"
            ),
            # A constraint, not unique=True: no second (LIKE) index to write with every callback.
            models.UniqueConstraint(fields=["webhook_id"], name="callback_unique_webhook_id"),
        ]
        indexes = [
            # What is due: small however many delivered rows are kept.
            models.Index(fields=["next_attempt_at"], condition=Q(state="pending"), name="callback_pending"),
            # The deliverer's claim, endpoint by endpoint (messaging.callbacks.delivery._CLAIM_SQL).
            models.Index(
                fields=["endpoint", "next_attempt_at"],
                condition=Q(state="pending"),
                name="callback_pending_by_endpoint",
            ),
            models.Index(fields=["created_at"], name="callback_created"),
        ]

    def __str__(self) -> str:
        return f"callback {self.webhook_id}: message.{self.event} #{self.sequence} for {self.message_id}"


class SuppressionReason(models.TextChoices):
    STOP_KEYWORD = "stop_keyword"  # the recipient texted STOP (or a carrier synonym)
    PROVIDER_REPORTED = "provider_reported"  # a provider refused: opted out there, or not a valid address
    HARD_BOUNCE = "hard_bounce"  # the mailbox does not exist
    COMPLAINT = "complaint"  # marked as spam
    UNSUBSCRIBED = "unsubscribed"  # one-click unsubscribe, or the ESP's unsubscribe event
    MANUAL = "manual"  # added by the client (API, CSV import) or an operator


class Suppression(models.Model):
    """An address one client's messages must not go to on one channel, in a scope: never handed to
    any provider while active (messaging.suppressions). Lifting keeps the row, with who and why.

    `scope` "" covers every category except the client's opt-out-exempt ones (unless
    `covers_exempt`: the address cannot receive at all); a category name covers that category only.
    """

    client = models.ForeignKey(ApiClient, on_delete=models.CASCADE, related_name="suppressions")
    channel = models.CharField(max_length=16, choices=Channel.choices)
    # E.164 for sms and whatsapp, the lower-cased address for email (suppression_address).
    address = models.CharField(max_length=320)
    scope = models.CharField(max_length=100, blank=True, default="")
    reason = models.CharField(max_length=24, choices=SuppressionReason.choices)
    covers_exempt = models.BooleanField(default=False)
    source = models.CharField(max_length=200, blank=True, default="")  # what reported it
    note = models.TextField(blank=True, default="")
    created_at = models.DateTimeField()
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_reason = models.CharField(max_length=500, blank=True, default="")
    lifted_by = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        constraints = [
            # Also the index of every look-up: a batch's addresses of one client and channel.
            models.UniqueConstraint(
                fields=["client", "channel", "address", "scope"],
                condition=Q(lifted_at__isnull=True),
                name="suppression_unique_active",
            ),
        ]
        indexes = [models.Index(fields=["client", "-created_at"], name="suppression_client_created")]

    def __str__(self) -> str:
        scope = f" ({self.scope})" if self.scope else ""
        return f"{self.channel} suppression{scope}: {self.reason}"

    @property
    def active(self) -> bool:
        return self.lifted_at is None


class InboundAction(models.TextChoices):
    """What an inbound message did (messaging.suppressions.inbound)."""

    SUPPRESSED = "suppressed"  # STOP: a suppression added
    ALREADY_SUPPRESSED = "already_suppressed"  # STOP: the address was suppressed already
    LIFTED = "lifted"  # START: the STOP (and provider opt-out) suppressions lifted
    NOTHING_TO_LIFT = "nothing_to_lift"  # START: none was active
    HELP_REPLIED = "help_replied"  # HELP: answered with SMS_HELP_REPLY
    HELP_NOT_SENT = "help_not_sent"  # HELP: the reply could not be accepted (see the log)
    UNATTRIBUTED = "unattributed"  # a keyword, but no client ever sent to this number on this channel
    NONE = "none"  # not a keyword: an ordinary message, kept only as this record


class InboundMessage(models.Model):
    """A message a recipient sent to one of our numbers, as taken (no body: only what it did).
    One row per provider message id, so that a provider's retry of the webhook does nothing twice."""

    provider = models.CharField(max_length=32)
    provider_message_id = models.CharField(max_length=128)
    channel = models.CharField(max_length=16, choices=Channel.choices)
    # The client it was attributed to: the sender of the latest message dispatched to that number.
    client = models.ForeignKey(
        ApiClient, null=True, blank=True, on_delete=models.SET_NULL, related_name="inbound_messages"
    )
    sender = models.CharField(max_length=64)  # E.164 (a sender id as given otherwise)
    to = models.CharField(max_length=64)  # our number
    keyword = models.CharField(max_length=16, blank=True, default="")
    action = models.CharField(max_length=24, choices=InboundAction.choices)
    received_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "provider_message_id"], name="inbound_unique_provider_ref"),
        ]

    def __str__(self) -> str:
        return f"{self.provider} inbound {self.keyword or 'message'}: {self.action}"


class WhatsAppSession(models.Model):
    """A WhatsApp recipient's customer-service window: opened (or reopened) by each message they
    send us, for WHATSAPP_SESSION_WINDOW_HOURS; a free-form message goes only inside it
    (messaging.whatsapp_session). One row per number, upserted by the inbound webhook."""

    address = models.CharField(max_length=64, primary_key=True)  # E.164, as messages hold it
    last_inbound_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"WhatsApp {self.address}: last wrote {self.last_inbound_at:%Y-%m-%d %H:%M:%S}"


class RouteCondition(models.TextChoices):
    """How a provider takes new traffic (issue 24, messaging.route_health)."""

    HEALTHY = "healthy"  # its place in the route, or its weight's share
    # Its receipts say it drops messages: new messages prefer the route's next provider while a
    # small share of real traffic (lowest priority first) keeps probing it.
    DEGRADED = "degraded"
    # Taken out by an operator (or a drill): no new traffic while another provider of the route can.
    DRAINED = "drained"


class ProviderRoute(models.Model):
    """A provider's routing state, for one destination country or all of them: its condition
    (set by the receipt detector, an operator or a drill) and its weight in a traffic split.
    No row: healthy, in route order. Changed only through messaging.route_health.provider_route_set,
    which records every change as a RoutingChange."""

    provider = models.CharField(max_length=32)
    # ISO 3166-1 alpha-2 region of the recipient's E.164 number (phonenumbers); "": every country.
    country = models.CharField(max_length=2, blank=True, default="")
    condition = models.CharField(max_length=16, choices=RouteCondition.choices, default=RouteCondition.HEALTHY)
    # Share of the route's traffic among providers that have a weight (null: route order).
    weight = models.PositiveSmallIntegerField(null=True, blank=True)
    reason = models.CharField(max_length=300, blank=True, default="")
    source = models.CharField(max_length=100, blank=True, default="")  # detector, operator:<name>, drill:<id>
    changed_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["provider", "country"], name="provider_route_unique")]

    def __str__(self) -> str:
        return f"{self.provider}{f' ({self.country})' if self.country else ''}: {self.condition}"


class RoutingChange(models.Model):
    """One change of routing (condition or weight), who made it and why: the log the dashboard and
    the admin show."""

    provider = models.CharField(max_length=32)
    country = models.CharField(max_length=2, blank=True, default="")
    from_condition = models.CharField(max_length=16, choices=RouteCondition.choices)
    to_condition = models.CharField(max_length=16, choices=RouteCondition.choices)
    from_weight = models.PositiveSmallIntegerField(null=True, blank=True)
    to_weight = models.PositiveSmallIntegerField(null=True, blank=True)
    reason = models.CharField(max_length=300, blank=True, default="")
    source = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["-created_at"], name="routing_change_created")]

    def __str__(self) -> str:
        where = f" ({self.country})" if self.country else ""
        return f"{self.provider}{where}: {self.from_condition} -> {self.to_condition}"
