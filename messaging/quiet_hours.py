"""Quiet hours: local hours in which a recipient is not disturbed, and the instant a message may go instead.

Pure logic (the clock is always an argument) except `quiet_hours_policy`, which reads the settings.

What "inside" means: the recipient's wall clock (the instant converted to the zone) shows a time in
[start, end); a window whose start is after its end crosses midnight (21:00–08:00). Nothing else,
so daylight saving time needs no special case for that test: on a spring-forward night the clock
jumps from 02:00 to 03:00 and shows 03:00 next, on a fall-back night it shows 01:00–02:00 twice and
both passes are tested as they come.

The release (the earliest instant ≥ `at` at which the recipient is outside the window in every one
of their zones: the most conservative reading of a number spanning several zones) needs the window's
end as an instant, a local time that may not exist or may exist twice on a DST night:
- spring forward, end in the gap (02:30 in New York on the second Sunday of March): the first
  instant the clock shows a time at or past the end is the transition itself (the clock jumps from
  01:59:59 EST to 03:00 EDT, 07:00 UTC). Neither fold of 02:30 is that instant (fold=0 reads it
  with the old offset, 07:30 UTC; fold=1 with the new one, 06:30 UTC, when the clock still shows
  01:30), so it is found by bisection between the two.
- fall back, end in the repeated hour (01:30 in New York on the first Sunday of November): the
  clock shows 01:30 first at 05:30 UTC (EDT, fold=0), then again at 06:30 UTC (EST, fold=1). The
  earliest of them after `at` is taken: the window has ended when the clock first shows its end.
  A message that is tested again during the repeated hour (a retry at 01:10 EST) is inside once
  more and waits for 01:30 EST: each test is of the wall clock at that instant.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import phonenumbers
from phonenumbers import timezone as phone_timezones

from messaging.conf import messaging_setting
from messaging.routing import Channel, Priority

# The window's ends: a wall-clock time, minutes only (a quiet hour starting at 21:00:30 is a typo).
_HH_MM = re.compile(r"\A([01][0-9]|2[0-3]):([0-5][0-9])\Z")
WINDOW_KEYS = frozenset({"start", "end", "exempt_priorities"})
DEFAULT_KEY = "default"
# What phonenumbers answers for a number it cannot place (e.g. +1 555 numbers): no quiet hours then.
UNKNOWN_ZONE = "Etc/Unknown"
# A release is looked for this far ahead; past it the zones' windows together cover the whole day
# (a number spanning more hours than the window leaves free) and _fallback_release decides.
_HORIZON = timedelta(days=3)
# How the note on a message whose deadline falls inside quiet hours starts (the sweeper's expiry
# event says "in quiet hours" when it sees it).
DEADLINE_IN_QUIET_HOURS = "quiet hours"


class QuietHoursError(ValueError):
    """A quiet-hours configuration that cannot work (the message says what and where)."""


@dataclass(frozen=True)
class QuietWindow:
    """A local window [start, end); crosses midnight when start > end."""

    start: time
    end: time
    # The priorities this window leaves alone; None: the QUIET_HOURS_EXEMPT_PRIORITIES setting.
    exempt_priorities: frozenset[str] | None = None

    @property
    def crosses_midnight(self) -> bool:
        return self.start > self.end

    def contains(self, local: time) -> bool:
        """Whether a wall-clock time is inside (fold is ignored: both passes of a repeated hour are)."""
        local = local.replace(fold=0)
        if self.crosses_midnight:
            return local >= self.start or local < self.end
        return self.start <= local < self.end


def parse_time(value: Any, where: str) -> time:
    if not isinstance(value, str) or not _HH_MM.match(value):
        raise QuietHoursError(f"{where} is {value!r}: write a local time as HH:MM, 00:00 to 23:59.")
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def parse_window(value: Any, where: str = "the window") -> QuietWindow:
    """A window from its configuration: {"start": "21:00", "end": "08:00"}, optionally with
    "exempt_priorities" (a list; [] makes even critical messages wait)."""
    if not isinstance(value, Mapping):
        raise QuietHoursError(f'{where} is {value!r}: give {{"start": "HH:MM", "end": "HH:MM"}} or null.')
    unknown = sorted(set(value) - WINDOW_KEYS)
    if unknown:
        raise QuietHoursError(
            f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; known: start, end, exempt_priorities."
        )
    missing = [key for key in ("start", "end") if key not in value]
    if missing:
        raise QuietHoursError(f"{where} needs {' and '.join(missing)}.")
    start, end = parse_time(value["start"], f"{where}['start']"), parse_time(value["end"], f"{where}['end']")
    if start == end:
        raise QuietHoursError(f"{where} starts and ends at {value['start']}: an empty (or whole-day) window.")
    exempt = value.get("exempt_priorities")
    if exempt is not None:
        exempt = parse_priorities(exempt, f"{where}['exempt_priorities']")
    return QuietWindow(start, end, exempt)


def parse_priorities(value: Any, where: str) -> frozenset[str]:
    if not isinstance(value, list | tuple) or not all(isinstance(p, str) and p in Priority.values for p in value):
        raise QuietHoursError(f"{where} is {value!r}: give a list of priorities among {', '.join(Priority.values)}.")
    return frozenset(value)


def parse_config(value: Any, where: str = "quiet hours") -> dict[str, QuietWindow | None]:
    """A QUIET_HOURS setting or ApiClient.quiet_hours: {category or "default": window or null}.
    A category mapped to null has no quiet hours (e.g. "otp": null beside a default window)."""
    if not isinstance(value, Mapping):
        raise QuietHoursError(
            f'{where} is {value!r}: give an object, e.g. {{"default": {{"start": "21:00", "end": "08:00"}}}}.'
        )
    config: dict[str, QuietWindow | None] = {}
    for key, window in value.items():
        if not isinstance(key, str) or not key:
            raise QuietHoursError(f"{where} has the key {key!r}: keys are categories, or 'default'.")
        config[key] = None if window is None else parse_window(window, f"{where}[{key!r}]")
    return config


def window_for(config: Mapping[str, QuietWindow | None], category: str) -> QuietWindow | None:
    """The category's own window (null: none), else the default one."""
    if category in config:
        return config[category]
    return config.get(DEFAULT_KEY)


# --- the recipient's time zones ---------------------------------------------------------------


@functools.cache
def valid_time_zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def time_zone(name: str) -> ZoneInfo:
    """The IANA zone of that name; QuietHoursError for a name the tz database does not have."""
    if name not in valid_time_zone_names():
        raise QuietHoursError(f"{name!r} is not an IANA time zone name (e.g. Europe/London, America/New_York).")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise QuietHoursError(f"{name!r} is not an IANA time zone name.") from None


@functools.lru_cache(maxsize=65536)
def number_time_zones(number: str) -> tuple[ZoneInfo, ...]:
    """The zones phonenumbers places an E.164 number in (several for e.g. an Australian or Russian
    mobile number; none when it cannot tell). Cached: parsing costs ~10 µs a number."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return ()
    zones = []
    for name in phone_timezones.time_zones_for_number(parsed):
        if name == UNKNOWN_ZONE:
            continue
        try:
            zones.append(ZoneInfo(name))
        except (ZoneInfoNotFoundError, ValueError):
            continue  # a name phonenumbers knows and this tz database does not
    return tuple(zones)


def recipient_time_zones(*, channel: str, to: str, explicit: str = "") -> tuple[tzinfo, ...]:
    """The zones quiet hours are kept in: the one given with the message, else the phone number's
    (none for an email address, or a number phonenumbers cannot place)."""
    if explicit:
        try:
            return (time_zone(explicit),)
        except QuietHoursError:
            return ()  # validated at acceptance; a zone dropped from tzdata since then keeps no hours
    if channel == Channel.EMAIL:
        return ()
    return number_time_zones(to.removeprefix("whatsapp:"))


# --- the release instant ----------------------------------------------------------------------


def inside(window: QuietWindow, zone: tzinfo, at: datetime) -> bool:
    return window.contains(at.astimezone(zone).time())


def quiet_release(window: QuietWindow, zones: Iterable[tzinfo], at: datetime) -> datetime | None:
    """None when `at` is outside the window in every zone; else the earliest instant ≥ `at` at which
    it is outside in every zone (the most conservative of the zones). `at` must be aware."""
    zones = tuple(zones)
    # In UTC: an aware datetime with fold=1 never equals one in another zone (PEP 495), and a
    # release is stored as UTC anyway.
    at = t = at.astimezone(UTC)
    for _ in range(64):
        waiting = [zone for zone in zones if inside(window, zone, t)]
        if not waiting:
            return None if t is at else t
        t = max(_window_end(window, zone, t) for zone in waiting)
        if t - at > _HORIZON:
            break
    return _fallback_release(window, zones, at)


def _fallback_release(window: QuietWindow, zones: tuple[tzinfo, ...], at: datetime) -> datetime:
    """When the zones' windows together leave no free instant (a number spanning more hours than
    the window leaves free): wait until each window the message started inside has ended once."""
    return max(_window_end(window, zone, at) for zone in zones if inside(window, zone, at))


def _window_end(window: QuietWindow, zone: tzinfo, t: datetime) -> datetime:
    """The first instant after `t` (inside the window in `zone`) at which the clock shows its end."""
    local = t.astimezone(zone)
    day = local.date()
    if window.crosses_midnight and local.time().replace(fold=0) >= window.start:
        day += timedelta(days=1)
    # Always later than t (t is inside, so the clock has not shown the end yet); the guard keeps
    # quiet_release moving whatever a zone's rules do.
    return max(local_instant(day, window.end, zone, after=t), t + timedelta(seconds=1))


def local_instant(day: date, clock: time, zone: tzinfo, *, after: datetime) -> datetime:
    """The earliest instant after `after` at which the clock in `zone` first shows `clock` or later
    on `day`: the time itself when it exists once, the earlier pass still to come when it exists
    twice (fall back), the transition when it does not exist (spring forward)."""
    naive = datetime.combine(day, clock)
    readings = []
    for fold in (0, 1):
        instant = naive.replace(tzinfo=zone, fold=fold).astimezone(UTC)
        readings.append(instant)
    existing = [r for r in readings if r.astimezone(zone).replace(tzinfo=None) == naive]
    if existing:
        later = [r for r in existing if r > after]
        return min(later) if later else max(existing)
    # In a gap: fold=1 read it with the offset after the jump (earlier in UTC, the clock still
    # before the gap), fold=0 with the one before (later). The transition lies between.
    low, high = min(readings), max(readings)
    while high - low > timedelta(seconds=1):
        middle = low + (high - low) / 2
        if middle.astimezone(zone).replace(tzinfo=None) >= naive:
            high = middle
        else:
            low = middle
    return high.replace(microsecond=0) if high.microsecond else high


# --- the policy a message is held to ------------------------------------------------------------


@dataclass(frozen=True)
class QuietHoursPolicy:
    """The windows in force for one client (its own configuration, else the setting)."""

    config: Mapping[str, QuietWindow | None]
    exempt_priorities: frozenset[str]

    def release(
        self, *, priority: str, category: str, channel: str, to: str, timezone_name: str, at: datetime
    ) -> datetime | None:
        """When a message of these attributes, due at `at`, may go (None: at `at`, not quiet)."""
        if not self.config:
            return None
        window = window_for(self.config, category)
        if window is None:
            return None
        exempt = self.exempt_priorities if window.exempt_priorities is None else window.exempt_priorities
        if priority in exempt:
            return None
        zones = recipient_time_zones(channel=channel, to=to, explicit=timezone_name)
        if not zones:
            return None
        return quiet_release(window, zones, at)


@functools.lru_cache(maxsize=256)
def _parsed(serialized: str) -> dict[str, QuietWindow | None]:
    return parse_config(json.loads(serialized))


def quiet_hours_policy(client_config: Any = None) -> QuietHoursPolicy:
    """The policy of a client whose ApiClient.quiet_hours is `client_config` (None: the
    QUIET_HOURS setting). A stored configuration that no longer parses (it was validated when
    saved) keeps no quiet hours rather than stopping every send."""
    global _last_policy
    raw = messaging_setting("QUIET_HOURS") if client_config is None else client_config
    exempt_setting = messaging_setting("QUIET_HOURS_EXEMPT_PRIORITIES")
    last = _last_policy
    if last is not None and last[0] is raw and last[1] is exempt_setting:
        return last[2]  # the same objects as the last call (a batch of one client): ~11 us saved a message
    try:
        config = _parsed(json.dumps(raw, sort_keys=True))
    except (QuietHoursError, TypeError, ValueError):
        config = {}
    policy = QuietHoursPolicy(config, frozenset(exempt_setting))
    _last_policy = (raw, exempt_setting, policy)  # held: their ids cannot be reused while cached
    return policy


_last_policy: tuple[Any, Any, QuietHoursPolicy] | None = None


def deadline_note(*, release: datetime, expires_at: datetime) -> str:
    """What a message that will expire waiting for quiet hours to end says (last_error_message)."""
    return (
        f"{DEADLINE_IN_QUIET_HOURS} until {release.astimezone(UTC):%Y-%m-%d %H:%M} UTC in the recipient's time "
        f"zone; its deadline ({expires_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC) comes first, so it expires "
        "instead of being sent"
    )
