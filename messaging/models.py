"""Messages, their dispatch attempts and lifecycle events, and the API clients that own them."""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q

from messaging.routing import Channel, Priority
from messaging.states import MessageState


class ApiClient(models.Model):
    """A sender holding API keys; it sees and replays only its own messages."""

    name = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name


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


class ErrorType(models.TextChoices):
    """Why a send failed: the fixed vocabulary used by attempts, dead letters and metrics."""

    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_5XX = "provider_5xx"
    RATE_LIMITED = "rate_limited"
    CONNECTION_ERROR = "connection_error"
    PROVIDER_AUTH = "provider_auth"
    INVALID_RECIPIENT = "invalid_recipient"
    REJECTED = "rejected"
    CIRCUIT_OPEN = "circuit_open"
    WORKER_LOST = "worker_lost"
    EXPIRED = "expired"
    NO_ROUTE = "no_route"
    UNKNOWN = "unknown"


class Message(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    client = models.ForeignKey(ApiClient, on_delete=models.PROTECT, related_name="messages")
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
    expires_at = models.DateTimeField()
    fallback_channels = models.JSONField(default=list, blank=True)
    fallback_to = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True)

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

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["client", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="message_unique_idempotency_key_per_client",
            ),
        ]
        indexes = [
            models.Index(fields=["client", "-created_at"], name="message_client_created"),
            models.Index(fields=["state", "next_attempt_at"], name="message_state_next_attempt"),
            models.Index(fields=["provider", "provider_message_id"], name="message_provider_ref"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} {self.id} ({self.state})"

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


class DispatchAttempt(models.Model):
    """One try at handing a message to a provider (or at finding out whether it already has it)."""

    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="attempts")
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
        indexes = [models.Index(fields=["message", "outcome"], name="attempt_message_outcome")]

    def __str__(self) -> str:
        return f"attempt {self.number} of {self.message_id} via {self.provider}: {self.outcome}"


class EventSource(models.TextChoices):
    API = "api"
    WORKER = "worker"
    SWEEPER = "sweeper"
    WEBHOOK = "webhook"
    POLL = "poll"
    ADMIN = "admin"


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
