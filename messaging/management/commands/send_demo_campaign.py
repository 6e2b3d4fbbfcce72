"""manage.py send_demo_campaign: send a small campaign through the running stack and watch it settle."""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import requests
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from messaging.management.commands.demo_setup import DEMO_QUIET_CATEGORY, demo_key_path
from messaging.states import SETTLED_STATES
from providers.conf import providers_setting

SCHEDULED = 3  # reminders sent later (send_at)
ORDER = [
    "accepted",
    "dispatched",
    "delivered",
    "read",
    "undelivered",
    "failed",
    "expired",
    "cancelled",
    "dead_lettered",
]


class Command(BaseCommand):
    help = (
        "Send a demo campaign (critical OTPs and transactional notices) through the running stack's API, with the "
        "sandbox injecting provider errors so retries show, and print progress until every message is settled "
        "(delivered, or in a final state). Start the stack first with `make run`."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--count", type=int, default=30, help="Notices to send (default 30; 5 critical OTPs are added)."
        )
        parser.add_argument(
            "--error-rate", type=float, default=0.2, help="Share of sends the sandbox answers with a 500 (default 0.2)."
        )
        parser.add_argument("--api-url", default=providers_setting("PUBLIC_URL"))
        parser.add_argument("--key", help="API key (default: the one `make run` saved in var/demo_api_key).")
        parser.add_argument("--timeout", type=float, default=120.0, help="Seconds to wait for every message to settle.")

    def handle(self, *args, count: int, error_rate: float, api_url: str, key: str | None, timeout: float, **options):
        api_url = api_url.rstrip("/")
        key = key or self._saved_key()
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        self._set_sandbox_errors(error_rate)
        run = uuid.uuid4().hex[:8]
        items = [
            {
                "channel": "sms",
                "to": f"+1415555{2671 + i:04d}",
                "body": f"Your login code is {100000 + i}",
                "priority": "critical",
                "category": f"demo-{run}",
                "idempotency_key": f"demo-{run}-otp-{i}",
            }
            for i in range(5)
        ] + [
            {
                "channel": "sms",
                "to": f"+1202555{100 + i:04d}",
                "body": "Your parcel arrives tomorrow between 9 and 12.",
                "priority": "transactional",
                "category": f"demo-{run}",
                "idempotency_key": f"demo-{run}-notice-{i}",
            }
            for i in range(count)
        ]
        items += _whatsapp_items(run)
        # Scheduled sends (docs/scheduling.md): accepted now, sent 5, 10 and 15 s from now.
        now = datetime.now(UTC)
        items += [
            {
                "channel": "sms",
                "to": f"+1202555{900 + i:04d}",
                "body": "Reminder: your appointment is in one hour.",
                "priority": "transactional",
                "category": f"demo-{run}",
                "idempotency_key": f"demo-{run}-reminder-{i}",
                "send_at": (now + timedelta(seconds=5 * (i + 1))).isoformat(),
            }
            for i in range(SCHEDULED)
        ]
        try:
            response = session.post(f"{api_url}/api/v1/messages/batch/", json={"messages": items}, timeout=60)
        except requests.ConnectionError:
            raise CommandError(f"Nothing answers at {api_url}: start the stack with `make run` first.") from None
        if response.status_code == 401:
            raise CommandError("The API refused the key: restart `make run` (it writes a new demo key) or pass --key.")
        response.raise_for_status()
        ids = [r["message"]["id"] for r in response.json()["results"] if r["status"] in (200, 201)]
        self.stdout.write(
            f"Sent {len(ids)} messages (campaign demo-{run}; {SCHEDULED} of them scheduled 5 to 15 s ahead, "
            f"accepted until then); sandbox error rate {error_rate:.0%}."
        )
        started = time.monotonic()
        counts: Counter = Counter()
        providers: Counter = Counter()
        while time.monotonic() - started < timeout:
            counts, providers = self._states(session, api_url, f"demo-{run}")
            line = "  ".join(f"{state} {counts[state]}" for state in ORDER if counts[state])
            sys.stdout.write(f"\r[{time.monotonic() - started:5.1f}s] {line}\033[K")
            sys.stdout.flush()
            if sum(counts[s] for s in SETTLED_STATES if s != "dispatched") == len(ids):
                break
            time.sleep(0.5)
        sys.stdout.write("\n")
        settled = sum(counts[s] for s in SETTLED_STATES if s != "dispatched")
        if settled < len(ids):
            raise CommandError(
                f"{len(ids) - settled} messages not settled after {timeout:.0f}s: check the workers' output."
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"All {len(ids)} messages settled in {time.monotonic() - started:.1f}s: "
                + ", ".join(f"{counts[s]} {s}" for s in ORDER if counts[s])
            )
        )
        self.stdout.write(
            "Sent via " + ", ".join(f"{name} {n}" for name, n in providers.most_common()) + " (a failed twilio send "
            "falls back to vonage at once). Every provider request, with the injected errors: "
            f"{settings.SANDBOX_URL}/_sandbox/requests"
        )
        self._show_edges(session, api_url, ids, run)

    def _show_edges(self, session: requests.Session, api_url: str, ids: list[str], run: str) -> None:
        """What happened at the edges (issue 23): the deadline each OTP carried to the provider, the
        WhatsApp template and free-form message, and a message held by quiet hours, then cancelled."""
        self.stdout.write("\nAt the edges:")
        told = []
        for message_id in ids[:5]:  # the critical OTPs come first
            sent = requests.get(
                f"{settings.SANDBOX_URL}/_sandbox/requests", params={"message_id": message_id}, timeout=10
            ).json()["requests"]
            for request in (r for r in sent if r.get("accepted")):
                if request.get("validity_period"):
                    told.append(f"twilio ValidityPeriod={request['validity_period']}")
                elif request.get("ttl"):
                    told.append(f"vonage ttl={request['ttl']}")
        self.stdout.write(
            "  deadlines  each OTP (5 minutes to live) told its provider how long it may still try: "
            f"{', '.join(told) or 'none recorded'} (docs/deadlines.md)"
        )
        whatsapp = [
            m for m in self._messages(session, api_url, f"demo-{run}") if m["channel"] == "whatsapp" or m["template"]
        ]
        for message in whatsapp:
            kind = "template" if message["template"] else "free-form"
            error = (message.get("last_error") or {}).get("type") or ""
            self.stdout.write(
                f"  whatsapp   {kind}: {message['state']}{f' ({error})' if error else ''} (docs/whatsapp.md)"
            )
        self._show_quiet_hours(session, api_url, run)

    def _show_quiet_hours(self, session: requests.Session, api_url: str, run: str) -> None:
        """A reminder to a recipient where it is night now: held until morning there, then cancelled."""
        zone = _night_zone(datetime.now(UTC))
        response = session.post(
            f"{api_url}/api/v1/messages/",
            json={
                "channel": "sms",
                "to": "+14155550123",
                "body": "Your order has shipped.",
                "category": DEMO_QUIET_CATEGORY,
                "timezone": zone,
                "idempotency_key": f"demo-{run}-quiet",
            },
            timeout=30,
        )
        if response.status_code not in (200, 201):
            self.stdout.write(f"  quiet      not shown: the API answered {response.status_code} {response.text[:200]}")
            return
        message = response.json()
        if not message.get("next_attempt_at"):
            self.stdout.write(
                f"  quiet      sent at once: the demo client has no quiet hours for {DEMO_QUIET_CATEGORY!r} "
                "(restart `make run`: demo_setup sets them)"
            )
            return
        local = datetime.fromisoformat(message["next_attempt_at"]).astimezone(ZoneInfo(zone))
        session.post(f"{api_url}/api/v1/messages/{message['id']}/cancel/", timeout=30)
        self.stdout.write(
            f"  quiet      a notice to a recipient in {zone} (night there now) waits until "
            f"{local:%H:%M} local time; cancelled before then (docs/quiet-hours.md)"
        )

    def _messages(self, session: requests.Session, api_url: str, category: str) -> list[dict]:
        messages: list[dict] = []
        url, params = f"{api_url}/api/v1/messages/", {"category": category, "page_size": 500}
        while url:
            page = session.get(url, params=params, timeout=30).json()
            messages += page["results"]
            url, params = page.get("next"), None
        return messages

    def _saved_key(self) -> str:
        try:
            return demo_key_path().read_text().strip()
        except FileNotFoundError:
            raise CommandError(
                "No demo key in var/demo_api_key: start the stack with `make run` first, or pass --key."
            ) from None

    def _set_sandbox_errors(self, error_rate: float) -> None:
        try:
            requests.post(
                f"{settings.SANDBOX_URL}/_sandbox/faults",
                json={"provider": "twilio", "error_rate": error_rate, "latency_ms": 50},
                timeout=5,
            )
        except requests.ConnectionError:
            raise CommandError(
                f"The sandbox provider does not answer at {settings.SANDBOX_URL}: is `make run` up?"
            ) from None

    def _states(self, session: requests.Session, api_url: str, category: str) -> tuple[Counter, Counter]:
        counts: Counter = Counter()
        providers: Counter = Counter()
        url, params = f"{api_url}/api/v1/messages/", {"category": category, "page_size": 500}
        while url:
            page = session.get(url, params=params, timeout=30).json()
            counts.update(m["state"] for m in page["results"])
            providers.update(m["provider"] for m in page["results"] if m["provider"])
            url, params = page.get("next"), None
        return counts, providers


_ZONES = ("Pacific/Auckland", "Asia/Tokyo", "Asia/Kolkata", "Europe/London", "America/New_York", "America/Los_Angeles")


def _night_zone(now: datetime) -> str:
    """A zone where it is between 22:00 and 07:00 now (one of six spread round the world)."""
    for name in _ZONES:
        hour = now.astimezone(ZoneInfo(name)).hour
        if hour >= 22 or hour < 7:
            return name
    return _ZONES[0]


# A Twilio Content SID of the shape Twilio gives (the sandbox takes any; Twilio, only its own).
DEMO_TEMPLATE = "HX" + "0123456789abcdef" * 2


def _whatsapp_items(run: str) -> list[dict]:
    """WhatsApp (docs/whatsapp.md): nobody has written to us, so the template goes and the
    free-form message fails at once (outside_session_window), never reaching Twilio."""
    common = {"channel": "whatsapp", "to": "+14155550199", "category": f"demo-{run}"}
    return [
        {
            **common,
            "template": DEMO_TEMPLATE,
            "variables": {"1": "Ada", "2": "12:30"},
            "idempotency_key": f"demo-{run}-whatsapp-template",
        },
        {**common, "body": "Your table is ready.", "idempotency_key": f"demo-{run}-whatsapp-free-form"},
    ]
