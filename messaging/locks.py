"""Cluster-wide locks for jobs that must not run twice at once (the sweep, a reconciliation run)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection


def cluster_lock_id(name: str) -> int:
    """A stable 64-bit advisory lock id for a job name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def cluster_lock(name: str) -> Iterator[bool]:
    """Hold the named lock for the block if it is free; yields whether it was.

    A session-level PostgreSQL advisory lock: it goes with the connection when the process dies,
    so a worker killed mid-job does not keep the job from running (a lock with a timeout, as in
    Redis, would keep it off for the whole timeout). Another database (none Conductor runs on:
    `make run` runs PostgreSQL too) gets no lock.
    """
    if connection.vendor != "postgresql":
        yield True
        return
    lock_id = cluster_lock_id(name)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [lock_id])
        acquired = cursor.fetchone()[0]
    try:
        yield acquired
    finally:
        if acquired:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_unlock(%s)", [lock_id])
