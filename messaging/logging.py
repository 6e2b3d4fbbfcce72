"""Log helpers: recipients are masked so logs never hold a full phone number or address, and
records logged inside a Celery task carry its id (the JSON formatter is configured in settings)."""

from __future__ import annotations

import logging
import re


def masked(recipient: str) -> str:
    """'+14155550123' -> '+1415*****23'; 'alice@example.com' -> 'a***@example.com'."""
    if not recipient:
        return ""
    if "@" in recipient:
        local, _, domain = recipient.partition("@")
        return f"{local[:1]}***@{domain}"
    keep_head, keep_tail = 5, 2
    if len(recipient) <= keep_head + keep_tail:
        return recipient[:2] + "*" * max(0, len(recipient) - 2)
    return recipient[:keep_head] + "*" * (len(recipient) - keep_head - keep_tail) + recipient[-keep_tail:]


# A phone number (E.164, or a bare run of 10-15 digits a provider echoes back) or an email
# address inside free text; dates, codes and counts stay readable.
_PHONE = re.compile(r"\+\d{7,15}\b|\b\d{10,15}\b")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def scrubbed(text: str) -> str:
    """Free text (a provider's error message, a transition detail) with recipients masked."""
    text = _EMAIL.sub(lambda m: masked(m.group()), text)
    return _PHONE.sub(lambda m: masked(m.group()), text)


class CeleryTaskFilter(logging.Filter):
    """Adds the running Celery task's id and name to every record logged inside a task."""

    def filter(self, record: logging.LogRecord) -> bool:
        from celery import current_task

        # One look-up, not the proxy's two (its truth test resolves it as well): this runs for
        # every record, in the web too.
        task = current_task._get_current_object()
        task_id = getattr(getattr(task, "request", None), "id", None) if task is not None else None
        if task_id:
            record.task_id = task_id
            record.task_name = task.name
        return True
