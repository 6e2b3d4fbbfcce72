"""Placeholder for the delivery kick (helper A2's trigger.py replaces it at merge)."""


def callbacks_kick() -> None:
    pass
