"""Inbound SMS and WhatsApp messages: the carriers' opt-out keywords feed the suppression list
(and a WhatsApp message opens its sender's customer-service window, messaging.whatsapp_session).

A recipient who texts STOP (or a synonym) to our number is suppressed for the client that last
sent to that number on that channel; START (UNSTOP, YES) lifts what STOP and the provider's own
opt-out added; HELP (INFO) is answered with the SMS_HELP_REPLY setting. Anything else is kept
only as a record of its arrival. Each provider message id is taken once: a provider retrying its
webhook changes nothing twice (docs/suppressions.md, "Inbound messages").
"""

from __future__ import annotations

import dataclasses
import logging
import unicodedata
from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import Subquery
from django.utils import timezone

from messaging.conf import messaging_setting
from messaging.ingest import IdempotencyConflict, IdempotencyInFlight
from messaging.limits import PriorityNotAllowed, QuotaExceeded
from messaging.logging import masked
from messaging.metrics import inbound_message_count
from messaging.models import ApiClient, EventSource, InboundAction, InboundMessage, Message, SuppressionReason
from messaging.routing import Channel, Priority
from messaging.services import message_create
from messaging.suppressions.selectors import suppression_address
from messaging.suppressions.services import suppression_add, suppressions_lift_matching
from messaging.whatsapp_session import whatsapp_session_record
from providers.types import InboundMessage as Inbound

logger = logging.getLogger(__name__)

# The carriers' (CTIA) keyword sets, as Twilio and Vonage honour them.
STOP_KEYWORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"})
START_KEYWORDS = frozenset({"START", "UNSTOP", "YES"})
HELP_KEYWORDS = frozenset({"HELP", "INFO"})
# What START lifts: the recipient's own opt-outs, never a bounce, an invalid number or a manual entry.
START_LIFTS = (SuppressionReason.STOP_KEYWORD, SuppressionReason.PROVIDER_REPORTED)
# The category of the message that answers a HELP for a provider that cannot reply in its
# webhook's answer (Vonage): a client may list it among its opt-out-exempt categories.
HELP_REPLY_CATEGORY = "help_reply"


def inbound_keyword(body: str) -> str:
    """The keyword a message is, upper-cased, or "": the whole message, whitespace around it and
    punctuation after it ignored, any case ("Stop." and " stop!" are STOP; "stop please" is not)."""
    text = body.strip()
    while text and (unicodedata.category(text[-1]).startswith("P") or text[-1].isspace()):
        text = text[:-1]
    word = text.upper()
    return word if word in STOP_KEYWORDS | START_KEYWORDS | HELP_KEYWORDS else ""


def help_reply_text() -> str:
    """SMS_HELP_REPLY, or "" when HELP is not to be answered ("" or "none": the environment cannot
    set an empty value, and Twilio answers HELP itself on numbers with its default keyword handling)."""
    text = messaging_setting("SMS_HELP_REPLY")
    return "" if text.strip().lower() in ("", "none") else text


def inbound_attributed_client(*, channel: str, address: str) -> ApiClient | None:
    """The client of the latest message dispatched to `address` on `channel` (one query on the
    message_recipient_dispatched index), or None if no client ever sent there. One number is
    shared by every client, so the most recent sender is the one the recipient answers."""
    latest = (
        Message.objects.filter(channel=channel, to=address, dispatched_at__isnull=False)
        .order_by("-dispatched_at")
        .values("client_id")[:1]
    )
    return ApiClient.objects.filter(pk=Subquery(latest)).first()


@dataclass(frozen=True)
class InboundOutcome:
    """What an inbound message did; `reply` is the text to answer it with in the webhook's answer
    ("" none) for a provider that replies so; `duplicate`: taken before, nothing done again."""

    action: str
    keyword: str
    client: ApiClient | None
    reply: str
    duplicate: bool = False


def inbound_receive(*, inbound: Inbound, replies_in_answer: bool, now: datetime | None = None) -> InboundOutcome:
    """Take one verified inbound message: record it once per provider message id and act on its
    keyword, in one transaction (a concurrent retry of the same message waits, then finds it taken).
    `replies_in_answer`: the provider answers HELP in its webhook's answer (Twilio); otherwise
    the reply is a message sent through Conductor (critical, category help_reply)."""
    now = now or timezone.now()
    # E.164 as messages hold it (providers send it so; a stray space or prefix would miss the sender).
    inbound = dataclasses.replace(inbound, from_=suppression_address(inbound.channel, inbound.from_))
    keyword = inbound_keyword(inbound.body)
    client = inbound_attributed_client(channel=inbound.channel, address=inbound.from_)
    help_reply = help_reply_text() if keyword in HELP_KEYWORDS else ""
    with transaction.atomic():
        try:
            with transaction.atomic():
                record = InboundMessage.objects.create(
                    provider=inbound.provider,
                    provider_message_id=inbound.provider_message_id,
                    channel=inbound.channel,
                    client=client,
                    sender=inbound.from_,
                    to=inbound.to,
                    keyword=keyword,
                    action=InboundAction.NONE,
                    received_at=now,
                )
        except IntegrityError:  # inbound_unique_provider_ref: the provider retried a message we took
            taken = InboundMessage.objects.get(
                provider=inbound.provider, provider_message_id=inbound.provider_message_id
            )
            logger.info(
                "%s inbound %s from %s taken already (%s): nothing done again",
                inbound.provider,
                inbound.provider_message_id,
                masked(inbound.from_),
                taken.action,
            )
            reply = help_reply if replies_in_answer and taken.action == InboundAction.HELP_REPLIED else ""
            return InboundOutcome(taken.action, taken.keyword, taken.client, reply, duplicate=True)
        if inbound.channel == Channel.WHATSAPP:
            # Any message from them, a keyword or not, opens their customer-service window.
            whatsapp_session_record(address=inbound.from_, at=now)
        action = _act(inbound, keyword, client, help_reply, replies_in_answer, now)
        if action != InboundAction.NONE:
            InboundMessage.objects.filter(pk=record.pk).update(action=action)
    inbound_message_count(provider=inbound.provider, channel=inbound.channel, action=action)
    logger.info(
        "%s inbound %s from %s to %s: %s%s",
        inbound.provider,
        inbound.channel,
        masked(inbound.from_),
        masked(inbound.to),
        keyword or "no keyword",
        f", {action} for client {client.name}" if client is not None else f", {action}",
        extra={"event": "inbound_message", "provider": inbound.provider, "channel": inbound.channel, "action": action},
    )
    reply = help_reply if replies_in_answer and action == InboundAction.HELP_REPLIED else ""
    return InboundOutcome(action, keyword, client, reply)


def _act(
    inbound: Inbound, keyword: str, client: ApiClient | None, help_reply: str, replies_in_answer: bool, now: datetime
) -> str:
    if not keyword:
        return InboundAction.NONE
    if keyword in HELP_KEYWORDS and replies_in_answer:
        # Answered whoever sent last: the reply names no client.
        return InboundAction.HELP_REPLIED if help_reply else InboundAction.NONE
    if client is None:
        logger.warning(
            "%s inbound %s from %s: no message was ever dispatched to this number on %s, so no client's list changes",
            inbound.provider,
            keyword,
            masked(inbound.from_),
            inbound.channel,
        )
        return InboundAction.UNATTRIBUTED
    source = f"{inbound.provider} inbound"
    if keyword in STOP_KEYWORDS:
        _, created = suppression_add(
            client=client,
            channel=inbound.channel,
            address=inbound.from_,
            reason=SuppressionReason.STOP_KEYWORD,
            source=source,
            note=f"{keyword} ({inbound.provider} message {inbound.provider_message_id})",
            now=now,
        )
        return InboundAction.SUPPRESSED if created else InboundAction.ALREADY_SUPPRESSED
    if keyword in START_KEYWORDS:
        lifted = suppressions_lift_matching(
            client=client,
            channel=inbound.channel,
            address=inbound.from_,
            reasons=START_LIFTS,
            reason=f"the recipient sent {keyword}",
            by=source,
            now=now,
        )
        return InboundAction.LIFTED if lifted else InboundAction.NOTHING_TO_LIFT
    if not help_reply:
        return InboundAction.NONE
    return _help_reply_send(inbound, client, help_reply)


def _help_reply_send(inbound: Inbound, client: ApiClient, text: str) -> str:
    """The HELP answer as a message of the client's own (Vonage cannot reply in its webhook's
    answer): accepted like any, once per inbound message (its idempotency key)."""
    fields = {
        "channel": inbound.channel,
        "to": inbound.from_,
        "body": text,
        "priority": Priority.CRITICAL,
        "category": HELP_REPLY_CATEGORY,
    }
    key = f"help-reply:{inbound.provider}:{inbound.provider_message_id}"
    try:
        message_create(client=client, fields=fields, idempotency_key=key, source=EventSource.WEBHOOK)
    except (PriorityNotAllowed, QuotaExceeded, IdempotencyConflict, IdempotencyInFlight) as exc:
        logger.warning(
            "%s inbound HELP from %s: the reply for client %s was not accepted: %s",
            inbound.provider,
            masked(inbound.from_),
            client.name,
            exc,
        )
        return InboundAction.HELP_NOT_SENT
    return InboundAction.HELP_REPLIED
