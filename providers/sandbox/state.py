"""In-memory state of the sandbox provider: fault settings, request log, message store, RNG."""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import gc
import random
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

PROVIDERS = ("twilio", "vonage", "mailgun")
# realistic: every callback the provider documents, retried on its schedule (docs/sandbox.md);
# final_only: one callback with the final status, retried at once a few times (the old sandbox).
CALLBACK_MODES = ("realistic", "final_only")
# Outcomes of callbacks kept for GET /_sandbox/callbacks (the newest; by the process posting
# them, providers.sandbox.receipts); counters cover them all.
CALLBACK_LOG_LIMIT = 100_000
# Logged requests between two gc.freeze() calls (see record_request).
GC_FREEZE_EVERY = 10_000
RECEIPT_STATUSES = ("delivered", "undelivered", "failed", "read")
# What a recipient does with an email (Mailgun only; FaultSettings.recipient_outcomes): a hard
# bounce, a soft bounce (then delivered), a spam complaint or an unsubscribe after delivery.
EMAIL_FEEDBACK = ("hard_bounce", "soft_bounce", "complained", "unsubscribed")

# The address the request being served came from (providers.sandbox.app's middleware sets it):
# the request log's `remote`, which host sent it when workers run on several
# (tests/integration/test_multi_host.py).
REQUEST_REMOTE: contextvars.ContextVar[str | None] = contextvars.ContextVar("sandbox_request_remote", default=None)

# Values of the request log's `fault` field.
FAULT_NONE = "none"
FAULT_OUTAGE = "outage"
FAULT_RATE_429 = "rate_429"
FAULT_ERROR = "error"
FAULT_TIMEOUT = "timeout"
FAULT_DROP = "drop"
FAULT_RECEIPT_LOSS = "receipt_loss"
FAULT_INVALID = "invalid"
FAULT_AUTH = "auth"
FAULT_OPTED_OUT = "opted_out"
# Accepted, then failed with 63016: a free-form WhatsApp message outside the session window.
FAULT_OUTSIDE_SESSION_WINDOW = "outside_session_window"

# What happens to an accepted message after the response.
DELIVERY_RECEIPT = "receipt"
DELIVERY_DROP = "drop"
DELIVERY_RECEIPT_LOSS = "receipt_loss"

# How long after acceptance a message reaches its final status, unless configured (each provider's
# receipt_delay_ms; SandboxConfig.delivery_delay_ms, from CONDUCTOR_SANDBOX_DELIVERY_DELAY_MS).
DEFAULT_DELIVERY_DELAY_MS = 200.0

_RATE_FIELDS = ("error_rate", "rate_429", "timeout_rate", "drop_rate", "receipt_loss_rate")
_MS_FIELDS = ("latency_ms", "latency_max_ms", "timeout_hold_ms", "receipt_delay_ms")


@dataclass(frozen=True)
class SandboxConfig:
    """What the sandbox needs from Django settings: the credentials it checks and signs with."""

    twilio_account_sid: str
    twilio_auth_token: str
    seed: int | None = None
    vonage_api_key: str = "sandboxkey"
    vonage_api_secret: str = "sandbox-vonage-secret"
    vonage_signature_secret: str = "sandbox-vonage-signature-secret"
    vonage_signature_method: str = "sha256"
    mailgun_api_key: str = "sandbox-mailgun-api-key"
    mailgun_domain: str = "mg.example.com"
    mailgun_webhook_signing_key: str = "sandbox-mailgun-signing-key"
    # Where providers configured per account, not per message (Mailgun), post their webhooks.
    public_url: str = "http://127.0.0.1:8000"
    # Our numbers, the default "to" of an inbound message (providers.sandbox.inbound).
    twilio_from_number: str = "+15005550006"
    twilio_whatsapp_from: str = "whatsapp:+14155238886"
    vonage_from: str = "Conductor"
    # Where inbound message webhooks post (the number's webhook URL): Conductor's web.
    inbound_base_url: str = "http://127.0.0.1:8000"
    # Post receipt callbacks from a child process (providers.sandbox.poster), so that their
    # load does not slow the API's answers; False: from the sandbox's own event loop.
    callback_process: bool = True
    # Every provider's receipt_delay_ms at start and after a reset (the delivery delay; a validity
    # shorter than it expires the message: docs/deadlines.md).
    delivery_delay_ms: float = DEFAULT_DELIVERY_DELAY_MS


class FaultValidationError(ValueError):
    """A fault update the control API refuses (reported as 400 naming the field)."""

    def __init__(self, message: str, field_name: str | None) -> None:
        super().__init__(message)
        self.field = field_name


@dataclass
class FaultSettings:
    """Runtime fault knobs of one provider; the defaults make a perfectly healthy provider."""

    error_rate: float = 0.0
    rate_429: float = 0.0
    latency_ms: float = 0
    latency_max_ms: float = 0
    timeout_rate: float = 0.0
    timeout_hold_ms: float = 15000
    outage: bool = False
    drop_rate: float = 0.0
    # Silent drops to some destinations only, e.g. [{"prefix": "+44", "rate": 0.3}]: a number
    # (E.164) starting with a rule's prefix is dropped at the rule's rate instead of drop_rate
    # (the longest matching prefix wins): an aggregator losing one carrier route or country.
    drop_rules: list[dict[str, Any]] = field(default_factory=list)
    receipt_loss_rate: float = 0.0
    receipt_delay_ms: float = 200
    receipt_status: str = "delivered"
    # Like a real account's throughput cap: sends beyond this many in any one second get a 429
    # (0: no cap). Shows whether our own rate limiter keeps a campaign under the provider's.
    max_per_second: float = 0
    callback_mode: str = "realistic"
    # Multiplies the provider's real pauses between callback retries (providers.sandbox.retries):
    # at 0.01 Vonage's first retries come after 0.05, 0.1, 0.2 ... s and Mailgun's after 3, 6, 9 s,
    # so a receiver down for a few seconds still gets them; 1 is the providers' real time.
    callback_retry_scale: float = 0.01
    # Per recipient address (lower case), what becomes of an email to it: one of EMAIL_FEEDBACK,
    # over receipt_status (Mailgun only), e.g. {"gone@example.com": "hard_bounce"}.
    recipient_outcomes: dict[str, str] = field(default_factory=dict)
    # Numbers (E.164) that have opted out of this provider's sender, e.g. by texting it STOP: a
    # send to one is refused with the provider's own answer (Twilio 21610, Vonage status 7).
    # Set through the faults API (the whole list) or SandboxState.opt_out / opt_in (one number).
    opted_out: list[str] = field(default_factory=list)
    # WhatsApp's customer-service window (Twilio only): a free-form message to a number that has
    # not written in this many hours is accepted, then fails with 63016, as Twilio does; a template
    # (ContentSid) always goes. A number writes through POST /_sandbox/inbound. 0: not enforced.
    whatsapp_session_hours: float = 24.0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def updated(self, changes: dict[str, Any]) -> FaultSettings:
        """A copy with `changes` applied; validates everything first so a bad update changes nothing."""
        known = {f.name for f in dataclasses.fields(self)}
        for name, value in changes.items():
            if name not in known:
                raise FaultValidationError(f"unknown field {name!r}", name)
            _validate(name, value)
        return dataclasses.replace(self, **changes)


def _validate(name: str, value: Any) -> None:
    # bool is an int subclass: refuse it where a number is meant, so `"error_rate": true` is an error.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in _RATE_FIELDS and not (is_number and 0 <= value <= 1):
        raise FaultValidationError(f"{name} must be a number between 0 and 1", name)
    if name == "max_per_second" and not (is_number and value >= 0):
        raise FaultValidationError("max_per_second must be a non-negative number", name)
    if name == "whatsapp_session_hours" and not (is_number and value >= 0):
        raise FaultValidationError("whatsapp_session_hours must be a non-negative number (0: not enforced)", name)
    if name in _MS_FIELDS and not (is_number and value >= 0):
        raise FaultValidationError(f"{name} must be a non-negative number of milliseconds", name)
    if name == "outage" and not isinstance(value, bool):
        raise FaultValidationError("outage must be true or false", name)
    if name == "receipt_status" and value not in RECEIPT_STATUSES:
        raise FaultValidationError(f"receipt_status must be one of {', '.join(RECEIPT_STATUSES)}", name)
    if name == "callback_mode" and value not in CALLBACK_MODES:
        raise FaultValidationError(f"callback_mode must be one of {', '.join(CALLBACK_MODES)}", name)
    if name == "callback_retry_scale" and not (is_number and 0 <= value <= 1):
        raise FaultValidationError("callback_retry_scale must be a number between 0 and 1", name)
    if name == "recipient_outcomes" and not (
        isinstance(value, dict)
        and all(isinstance(address, str) and outcome in EMAIL_FEEDBACK for address, outcome in value.items())
    ):
        raise FaultValidationError(f"recipient_outcomes must map addresses to one of {', '.join(EMAIL_FEEDBACK)}", name)
    if name == "drop_rules" and not (
        isinstance(value, list)
        and all(
            isinstance(rule, dict)
            and set(rule) == {"prefix", "rate"}
            and isinstance(rule["prefix"], str)
            and _PREFIX.fullmatch(rule["prefix"])
            and isinstance(rule["rate"], (int, float))
            and not isinstance(rule["rate"], bool)
            and 0 <= rule["rate"] <= 1
            for rule in value
        )
    ):
        raise FaultValidationError(
            'drop_rules must be a list of {"prefix": "+<digits>", "rate": <0 to 1>} objects', name
        )
    if name == "opted_out" and not (
        isinstance(value, list) and all(isinstance(number, str) and _E164.fullmatch(number) for number in value)
    ):
        raise FaultValidationError("opted_out must be a list of E.164 numbers", name)


_E164 = re.compile(r"\+[1-9][0-9]{5,14}")
_PREFIX = re.compile(r"\+[1-9][0-9]{0,14}")


@dataclass(frozen=True)
class SendOutcome:
    """The dice rolled for one send: refused, or accepted with a response delay and a delivery fate."""

    refusal: str | None  # FAULT_RATE_429, FAULT_ERROR or None when accepted
    held: bool  # timeout case: accepted, answer held past the client's timeout
    delivery: str  # DELIVERY_* for accepted sends
    response_delay_s: float

    @property
    def fault(self) -> str:
        if self.refusal:
            return self.refusal
        if self.held:
            return FAULT_TIMEOUT
        if self.delivery == DELIVERY_DROP:
            return FAULT_DROP
        if self.delivery == DELIVERY_RECEIPT_LOSS:
            return FAULT_RECEIPT_LOSS
        return FAULT_NONE


@dataclass
class StoredMessage:
    """One accepted message, whichever provider emulation accepted it."""

    provider: str
    provider_message_id: str
    seq: int  # creation order, for newest-first listing and page tokens
    channel: str
    to: str
    from_: str
    body: str
    message_id: str | None
    token: str | None
    callback_url: str | None
    created_at: datetime
    final_status: str | None  # None for a dropped message: it stays `sent` forever
    final_at: datetime | None
    extra: dict[str, Any] = field(default_factory=dict)

    def status_at(self, now: datetime) -> str:
        # Computed on read rather than set by a timer, so a look-up is right even with no receipt.
        if self.final_status and self.final_at is not None and now >= self.final_at:
            return self.final_status
        return "sent"

    def updated_at(self, now: datetime) -> datetime:
        if self.final_status and self.final_at is not None and now >= self.final_at:
            return self.final_at
        return self.created_at


def utcnow() -> datetime:
    return datetime.now(UTC)


class SandboxState:
    """Everything the sandbox remembers; one instance per running app, reset by the control API."""

    def __init__(self, seed: int | None = None, *, delivery_delay_ms: float = DEFAULT_DELIVERY_DELAY_MS) -> None:
        self.rng = random.Random(seed)
        self.delivery_delay_ms = delivery_delay_ms
        self.faults: dict[str, FaultSettings] = self._default_faults()
        self.requests: list[dict[str, Any]] = []
        self.requests_by_message_id: dict[str, list[dict[str, Any]]] = {}
        self.messages: dict[str, StoredMessage] = {}
        # Overrides SandboxConfig.public_url (POST /_sandbox/config): where account-level
        # webhooks (Mailgun's) go. Not cleared by reset, like a provider's dashboard setting.
        self.public_url: str | None = None
        self._recent_sends: dict[str, collections.deque[float]] = {}
        self._seq = 0
        # When each number (E.164) last wrote to our WhatsApp sender (POST /_sandbox/inbound).
        self.whatsapp_last_inbound: dict[str, datetime] = {}

    def _default_faults(self) -> dict[str, FaultSettings]:
        return {name: FaultSettings(receipt_delay_ms=self.delivery_delay_ms) for name in PROVIDERS}

    def reset(self, seed: int | None = None, *, reseed: bool = False) -> None:
        self.faults = self._default_faults()
        self.requests.clear()
        self.requests_by_message_id.clear()
        self.messages.clear()
        # The capacity window too: sends before the reset must not count against the next test's
        # first second (a reset sandbox is a fresh account).
        self._recent_sends.clear()
        self.whatsapp_last_inbound.clear()  # a fresh account: nobody has written yet
        if reseed:
            self.rng.seed(seed)

    # --- opt-outs --------------------------------------------------------------------------
    def opt_out(self, provider: str, number: str) -> None:
        """`number` (E.164) opts out of `provider`'s sender, as a recipient's STOP would make it;
        its sends are refused from now on (an inbound STOP emulation calls this)."""
        faults = self.faults[provider]
        if number not in faults.opted_out:
            self.faults[provider] = faults.updated({"opted_out": [*faults.opted_out, number]})

    def opt_in(self, provider: str, number: str) -> None:
        """`number` opts back in (START): `provider` sends to it again."""
        faults = self.faults[provider]
        if number in faults.opted_out:
            self.faults[provider] = faults.updated({"opted_out": [n for n in faults.opted_out if n != number]})

    def is_opted_out(self, provider: str, number: str | None) -> bool:
        return bool(number) and number in self.faults[provider].opted_out

    # --- WhatsApp's session window -------------------------------------------------------------
    def whatsapp_wrote(self, number: str) -> None:
        """`number` sent us a WhatsApp message now: its customer-service window opens."""
        self.whatsapp_last_inbound[number] = utcnow()

    def whatsapp_window_open(self, provider: str, number: str) -> bool:
        hours = self.faults[provider].whatsapp_session_hours
        if not hours:
            return True
        wrote = self.whatsapp_last_inbound.get(number)
        return wrote is not None and utcnow() - wrote < timedelta(hours=hours)

    # --- faults ---------------------------------------------------------------------------
    def chance(self, rate: float) -> bool:
        return rate > 0 and (rate >= 1 or self.rng.random() < rate)

    def latency_s(self, provider: str) -> float:
        faults = self.faults[provider]
        if faults.latency_max_ms > faults.latency_ms:
            return self.rng.uniform(faults.latency_ms, faults.latency_max_ms) / 1000
        return faults.latency_ms / 1000

    def drop_rate_for(self, provider: str, to: str | None) -> float:
        """drop_rate, or the rate of the longest drop rule whose prefix the number starts with."""
        faults = self.faults[provider]
        number = (to or "").removeprefix("whatsapp:")
        matching = [rule for rule in faults.drop_rules if number.startswith(rule["prefix"])]
        if not matching:
            return faults.drop_rate
        return max(matching, key=lambda rule: len(rule["prefix"]))["rate"]

    def draw_send_outcome(self, provider: str, to: str | None = None) -> SendOutcome:
        """Roll the faults for a valid send to `to`, in the documented order (outage is checked earlier)."""
        faults = self.faults[provider]
        if self.chance(faults.rate_429) or self._over_capacity(provider, faults.max_per_second):
            return SendOutcome(FAULT_RATE_429, False, "", self.latency_s(provider))
        if self.chance(faults.error_rate):
            return SendOutcome(FAULT_ERROR, False, "", self.latency_s(provider))
        held = self.chance(faults.timeout_rate)
        delay = faults.timeout_hold_ms / 1000 if held else self.latency_s(provider)
        if self.chance(self.drop_rate_for(provider, to)):
            delivery = DELIVERY_DROP
        elif self.chance(faults.receipt_loss_rate):
            delivery = DELIVERY_RECEIPT_LOSS
        else:
            delivery = DELIVERY_RECEIPT
        return SendOutcome(None, held, delivery, delay)

    async def refuse(self, response: web.Response, *, fault: str, delay_s: float, **attribution: Any) -> web.Response:
        """Log a send that is not accepted (who it was for, why), then answer it after `delay_s`."""
        self.record_request(
            **attribution, accepted=False, status_code=response.status, provider_message_id=None, fault=fault
        )
        await asyncio.sleep(delay_s)
        return response

    def _over_capacity(self, provider: str, max_per_second: float) -> bool:
        """Sliding one-second window of accepted-for-processing sends per provider."""
        if not max_per_second:
            return False
        now = time.monotonic()
        window = self._recent_sends.setdefault(provider, collections.deque())
        while window and now - window[0] >= 1.0:
            window.popleft()
        if len(window) >= max_per_second:
            return True
        window.append(now)
        return False

    # --- request log ------------------------------------------------------------------------
    def record_request(
        self,
        *,
        provider: str,
        channel: str,
        message_id: str | None,
        token: str | None,
        to: str | None,
        body: str | None,
        accepted: bool,
        status_code: int,
        provider_message_id: str | None,
        fault: str,
        headers: dict[str, str] | None = None,
        fields: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "provider": provider,
            "channel": channel,
            "message_id": message_id,
            "token": token,
            "to": to,
            "body": body,
            "received_at": utcnow().isoformat(),
            "remote": REQUEST_REMOTE.get(),
            "accepted": accepted,
            "status_code": status_code,
            "provider_message_id": provider_message_id,
            "fault": fault,
        }
        if headers is not None:  # an email's extra headers, as the provider received them
            entry["headers"] = headers
        if fields:  # a provider's own fields worth checking: the validity it was given, a template
            entry.update(fields)
        self.requests.append(entry)
        if message_id:
            self.requests_by_message_id.setdefault(message_id, []).append(entry)
        if len(self.requests) % GC_FREEZE_EVERY == 0:
            # The log only grows: without this every full collection walks all of it, and a
            # 200,000-send campaign made the "provider" stall for ever longer pauses.
            gc.freeze()
        return entry

    def find_requests(
        self,
        *,
        provider: str | None = None,
        to: str | None = None,
        message_id: str | None = None,
        accepted: bool | None = None,
    ) -> list[dict[str, Any]]:
        # The message_id index keeps the common "how many times was this sent?" query cheap.
        rows = self.requests_by_message_id.get(message_id, []) if message_id else self.requests
        return [
            r
            for r in rows
            if (provider is None or r["provider"] == provider)
            and (to is None or r["to"] == to)
            and (accepted is None or r["accepted"] is accepted)
        ]

    # --- message store ----------------------------------------------------------------------
    def store_message(
        self,
        *,
        provider: str,
        provider_message_id: str,
        channel: str,
        to: str,
        from_: str,
        body: str,
        message_id: str | None,
        token: str | None,
        callback_url: str | None,
        outcome: SendOutcome,
        extra: dict[str, Any] | None = None,
    ) -> StoredMessage:
        """Store an accepted message with its final status and the time it takes effect."""
        now = utcnow()
        faults = self.faults[provider]
        dropped = outcome.delivery == DELIVERY_DROP
        self._seq += 1
        message = StoredMessage(
            provider=provider,
            provider_message_id=provider_message_id,
            seq=self._seq,
            channel=channel,
            to=to,
            from_=from_,
            body=body,
            message_id=message_id,
            token=token,
            callback_url=callback_url,
            created_at=now,
            final_status=None if dropped else faults.receipt_status,
            final_at=None if dropped else now + timedelta(milliseconds=faults.receipt_delay_ms),
            extra=extra or {},
        )
        self.messages[provider_message_id] = message
        return message

    @staticmethod
    def expire_after(message: StoredMessage, validity_s: float | None, *, status: str, **extra: Any) -> None:
        """The provider's validity (Twilio's ValidityPeriod, Vonage's ttl): a message whose validity
        runs out before its delivery (receipt_delay_ms) ends `status` at the moment it runs out,
        with `extra` (the provider's error) kept for its receipt. A dropped message stays dropped."""
        if validity_s is None or message.final_status is None or message.final_at is None:
            return
        ends = message.created_at + timedelta(seconds=validity_s)
        if ends < message.final_at:
            message.final_status, message.final_at = status, ends
            message.extra.update(extra)


# Typed keys under which build_app() stores the shared objects for every route module.
CONFIG_KEY = web.AppKey("sandbox_config", SandboxConfig)
STATE_KEY = web.AppKey("sandbox_state", SandboxState)
