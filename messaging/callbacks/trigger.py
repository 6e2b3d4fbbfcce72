"""Starting callback delivery once callbacks were written (placeholder until delivery lands)."""


def callbacks_kick() -> None:
    """Called on commit by the outbox writer; delivery replaces this."""
