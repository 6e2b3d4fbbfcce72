"""manage.py create_api_key NAME: create a client's API key and print it once."""

from django.core.management.base import BaseCommand

from messaging.services import api_key_create


class Command(BaseCommand):
    help = (
        "Create an API key for client NAME (the client is created if new) and print it once. "
        "Only its hash is stored: keep the printed key, it cannot be shown again."
    )

    def add_arguments(self, parser):
        parser.add_argument("name", help="Client name, e.g. 'billing-service'.")
        parser.add_argument("--quiet", action="store_true", help="Print only the key (for scripts).")

    def handle(self, *args, name: str, quiet: bool, **options):
        key, raw_key = api_key_create(client_name=name)
        if quiet:
            self.stdout.write(raw_key)
            return
        self.stdout.write(f"API key for client {name!r} (shown once, stored hashed):\n\n    {raw_key}\n")
        self.stdout.write("Use it as: Authorization: Bearer <key>")
