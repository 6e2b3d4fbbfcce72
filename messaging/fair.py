"""Fair sharing of bulk capacity between clients: which due bulk messages the next batch takes.

A campaign's messages used to travel to the workers as fixed lists of ids, BULK_BATCH_SIZE per
task, in the broker's first-in first-out order: another client's 20 messages posted after a
200,000-message campaign waited behind its 400 tasks. Now a bulk task names only its channel
(messaging.dispatch_bulk) and claims the next batch from PostgreSQL, the queue of record: an equal
share for every client with due bulk work on the channel, each client's oldest first. Publishing
is unchanged in amount (ingest and the sweeper publish one task per BULK_BATCH_SIZE messages), so
there are always as many tasks as batches of work; which messages a task takes is decided when it
runs, not when it was published. The 20 messages go with the next batch any worker starts.

Only plain sends are taken this way: a message with an ordering key, one whose outcome must be
looked up at the provider first, one past its deadline or its worker-loss budget has a task of its
own (published by whoever set it so), as before. A channel whose first provider is rate-limited
keeps the fixed-id batches: its messages are handed back one task each anyway (messaging.dispatch).

Concurrent claimers never wait for one another: each locks its picks with SKIP LOCKED, and a
message is claimable only while unleased, as before (Message.is_claimable, checked again on the
locked rows by the claim).
"""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime
from typing import Any

from django.db import connection

from messaging.conf import messaging_setting
from messaging.models import EARLY_TOLERANCE
from messaging.routing import Priority
from messaging.states import MessageState
from providers.guards import rate_limit


# message_bulk_fair's condition, written out (literals: the planner matches a partial index's
# condition against the query's text, never against a parameter).
def _plain_bulk(alias: str) -> str:
    return (
        f"{alias}.state = '{MessageState.ACCEPTED.value}' AND {alias}.priority = '{Priority.BULK.value}' "
        f"AND {alias}.sequence IS NULL"
    )


# The clients with accepted bulk messages on a channel: a loose index scan of message_bulk_fair
# (one index descent per client, however many messages each has).
_ACTIVE_CLIENTS = """
WITH RECURSIVE active(client_id) AS (
    (SELECT m.client_id FROM messaging_message m
     WHERE {plain_bulk_m} AND m.channel = %(channel)s
     ORDER BY m.client_id LIMIT 1)
    UNION ALL
    SELECT (SELECT m.client_id FROM messaging_message m
            WHERE {plain_bulk_m}
              AND m.channel = %(channel)s AND m.client_id > active.client_id
            ORDER BY m.client_id LIMIT 1)
    FROM active WHERE active.client_id IS NOT NULL
)
SELECT client_id FROM active WHERE client_id IS NOT NULL
""".replace("{plain_bulk_m}", _plain_bulk("m"))

# Up to %(share)s plain, due, unleased messages per client, its oldest first, locked; rows another
# claimer holds are skipped, not waited for.
_PICK = """
SELECT picked.id, picked.client_id FROM unnest(%(clients)s::bigint[]) AS client(id)
CROSS JOIN LATERAL (
    SELECT m.id, m.client_id FROM messaging_message m
    WHERE m.client_id = client.id AND m.channel = %(channel)s
      AND {plain_bulk_m}
      AND NOT m.needs_provider_lookup AND m.worker_loss_count < %(max_losses)s
      AND m.expires_at > %(now)s
      AND (m.lease_expires_at IS NULL OR m.lease_expires_at < %(now)s)
      AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= %(due)s)
      AND (m.send_at IS NULL OR m.send_at <= %(now)s)
      AND NOT (m.id = ANY(%(taken)s::uuid[]))
    ORDER BY m.created_at
    LIMIT %(share)s
    FOR UPDATE OF m SKIP LOCKED
) AS picked
""".replace("{plain_bulk_m}", _plain_bulk("m"))


def fair_sharing(channel: str) -> bool:
    """Whether the channel's bulk messages go by fair claims (else by fixed-id batches)."""
    route = messaging_setting("ROUTES").get(channel) or []
    return bool(
        messaging_setting("BULK_FAIR_SHARING")
        and connection.vendor == "postgresql"
        and route
        and rate_limit(route[0]).unlimited
    )


def bulk_pick_fair(*, channel: str, size: int, now: datetime) -> list[Any]:
    """Lock and return the ids of up to `size` claimable plain bulk messages of the channel, an
    equal share per client (a client with fewer leaves its share to the others). Call it inside
    the claim's transaction: the locks are what keep concurrent claimers apart."""
    base = {"channel": channel}
    with connection.cursor() as cursor:
        # A campaign that has just added 200,000 accepted rows is not in the statistics yet: the
        # planner then takes any index on accepted rows as returning one row, and sorts what it
        # reads (measured: 80-100 ms a pick, all of a client's rows read). Without sorts, only the
        # index that gives these queries their order is left: message_bulk_fair (about 1 ms).
        cursor.execute("SET LOCAL enable_sort = off")
        cursor.execute(_ACTIVE_CLIENTS, base)
        clients = [row[0] for row in cursor.fetchall()]
        taken: list[Any] = []
        # Round one gives each client an equal share; a client that had fewer is done, and the
        # next round shares what is left among the others (at most a few rounds).
        while clients and len(taken) < size:
            share = math.ceil((size - len(taken)) / len(clients))
            cursor.execute(
                _PICK,
                {
                    **base,
                    "clients": clients,
                    "share": share,
                    "max_losses": messaging_setting("MAX_WORKER_LOSSES"),
                    "now": now,
                    "due": now + EARLY_TOLERANCE,
                    "taken": "{" + ",".join(str(pk) for pk in taken) + "}",
                },
            )
            rows = cursor.fetchall()
            per_client = Counter(client_id for _, client_id in rows)
            taken += [pk for pk, _ in rows]
            clients = [client for client in clients if per_client[client] == share]
        cursor.execute("SET LOCAL enable_sort = on")  # the rest of the claim's transaction as before
    # A last round can overshoot by less than one row per client: those stay locked, unclaimed,
    # until the claim commits, and are taken by the next claim.
    return taken[:size]
