"""Vonage's SMS API wire format (to be filled in)."""

from __future__ import annotations

from aiohttp import web


def register(app: web.Application) -> None:
    """Add this provider's routes to the sandbox app."""
