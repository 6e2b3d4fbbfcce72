"""manage.py demo_setup: a fresh demo API key (written to var/demo_api_key), printed with a try-it command."""

from __future__ import annotations

import os

from django.conf import settings
from django.core.management.base import BaseCommand

from messaging.models import ApiClient
from messaging.services import api_key_create, api_key_revoke_all
from providers.conf import providers_setting

DEMO_CLIENT = "demo"
# The demo client's quiet hours: a notice in this category waits for morning (`make demo` shows one).
DEMO_QUIET_CATEGORY = "demo-quiet"
DEMO_QUIET_HOURS = {DEMO_QUIET_CATEGORY: {"start": "21:00", "end": "08:00"}}


def demo_key_path():
    return settings.VAR_DIR / "demo_api_key"


class Command(BaseCommand):
    help = (
        "Create a new API key for the 'demo' client (revoking its old ones, since only hashes are stored), "
        "save it to var/demo_api_key for `make demo`, and print it with a curl command that uses it."
    )

    def handle(self, *args, **options):
        api_key_revoke_all(client_name=DEMO_CLIENT)
        _, raw_key = api_key_create(client_name=DEMO_CLIENT)
        # Quiet hours for one category only (`make demo` shows a message held by them).
        ApiClient.objects.filter(name=DEMO_CLIENT).update(quiet_hours=DEMO_QUIET_HOURS)
        path = demo_key_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(raw_key + "\n")
        os.chmod(path, 0o600)
        public = providers_setting("PUBLIC_URL").rstrip("/")
        self.stdout.write(
            "\n".join(
                [
                    f"Demo API key {raw_key}   (saved to {path})",
                    f"  try: curl -s -X POST {public}/api/v1/messages/ -H 'Authorization: Bearer {raw_key}' \\",
                    "         -H 'Content-Type: application/json' \\",
                    '         -d \'{"channel": "sms", "to": "+14155552671", "body": "Hi"}\'',
                ]
            )
        )
