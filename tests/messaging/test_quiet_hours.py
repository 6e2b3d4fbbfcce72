"""Quiet hours' pure logic (messaging.quiet_hours): windows, a recipient's zones, the release instant
with an injected clock, across DST changes in both directions and for numbers in several zones."""

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings

from messaging.models import ApiClient
from messaging.quiet_hours import (
    QuietHoursError,
    QuietWindow,
    local_instant,
    parse_config,
    parse_window,
    quiet_hours_policy,
    quiet_release,
    recipient_time_zones,
)

NEW_YORK = ZoneInfo("America/New_York")
LONDON = ZoneInfo("Europe/London")
NIGHT = QuietWindow(time(21), time(8))  # crosses midnight
UK = "+442071838750"  # a London landline (a UK mobile number: London, Guernsey, Jersey, Isle of Man)
UK_MOBILE = "+447400123456"
INDIA = "+919876543210"
AUSTRALIA_MOBILE = "+61412345678"  # phonenumbers: eight zones, Cocos (UTC+6:30) to Lord Howe
SYDNEY_LANDLINE = "+61212345678"
US_NEW_YORK = "+12125551234"
US_LOS_ANGELES = "+16505551234"
US_UNKNOWN = "+15555555555"  # phonenumbers: Etc/Unknown


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def local(zone, *args, fold=0) -> datetime:
    return datetime(*args, tzinfo=zone, fold=fold)


def release(window, zones, at):
    return quiet_release(window, zones, at)


# --- windows ------------------------------------------------------------------------------------


def test_a_window_crossing_midnight_and_one_that_does_not():
    assert NIGHT.contains(time(21)) and NIGHT.contains(time(23, 59)) and NIGHT.contains(time(0))
    assert NIGHT.contains(time(7, 59)) and not NIGHT.contains(time(8)) and not NIGHT.contains(time(20, 59))
    lunch = parse_window({"start": "12:00", "end": "14:00"})
    assert lunch == QuietWindow(time(12), time(14))
    assert lunch.contains(time(12)) and lunch.contains(time(13, 59))
    assert not lunch.contains(time(14)) and not lunch.contains(time(11, 59)) and not lunch.contains(time(0))


@pytest.mark.parametrize(
    "value, problem",
    [
        ({"start": "21:00"}, "needs end"),
        ({"start": "9:00", "end": "08:00"}, "HH:MM"),
        ({"start": "21:00", "end": "24:00"}, "HH:MM"),
        ({"start": "21:00", "end": "21:00"}, "empty"),
        ({"start": "21:00", "end": "08:00", "stat": "x"}, "unknown key"),
        ({"start": "21:00", "end": "08:00", "exempt_priorities": ["urgent"]}, "priorities"),
        ({"start": 2100, "end": "08:00"}, "HH:MM"),
        ("21:00-08:00", "give"),
    ],
)
def test_a_bad_window_is_refused_with_what_is_wrong(value, problem):
    with pytest.raises(QuietHoursError, match=problem):
        parse_window(value)


def test_a_configuration_maps_categories_and_default_to_windows_or_none():
    config = parse_config(
        {"default": {"start": "21:00", "end": "08:00"}, "otp": None, "marketing": {"start": "20:00", "end": "09:00"}}
    )
    assert config == {"default": NIGHT, "otp": None, "marketing": QuietWindow(time(20), time(9))}
    with pytest.raises(QuietHoursError):
        parse_config([{"start": "21:00", "end": "08:00"}])
    with pytest.raises(QuietHoursError):
        parse_config({"": NIGHT})


# --- a recipient's zones ------------------------------------------------------------------------


def test_zones_come_from_the_number_in_several_countries():
    names = lambda to: sorted(zone.key for zone in recipient_time_zones(channel="sms", to=to))  # noqa: E731
    assert names(UK) == ["Europe/London"]
    assert names(INDIA) == ["Asia/Calcutta"]
    assert names(US_NEW_YORK) == ["America/New_York"]
    assert names(US_LOS_ANGELES) == ["America/Los_Angeles"]
    assert names(SYDNEY_LANDLINE) == ["Australia/Sydney"]
    assert len(names(AUSTRALIA_MOBILE)) > 3 and "Australia/Perth" in names(AUSTRALIA_MOBILE)
    assert names("whatsapp:" + UK) == ["Europe/London"]
    assert "Europe/London" in names(UK_MOBILE) and "Europe/Jersey" in names(UK_MOBILE)


def test_an_unknown_number_or_an_email_has_no_zone_unless_one_is_given():
    assert recipient_time_zones(channel="sms", to=US_UNKNOWN) == ()
    assert recipient_time_zones(channel="email", to="a@example.com") == ()
    assert recipient_time_zones(channel="email", to="a@example.com", explicit="Asia/Tokyo") == (ZoneInfo("Asia/Tokyo"),)
    # A given zone wins over the number's.
    assert recipient_time_zones(channel="sms", to=UK, explicit="Asia/Kolkata") == (ZoneInfo("Asia/Kolkata"),)


# --- the release --------------------------------------------------------------------------------


def test_outside_the_window_there_is_no_release():
    assert release(NIGHT, [LONDON], local(LONDON, 2026, 7, 1, 12)) is None
    assert release(NIGHT, [LONDON], local(LONDON, 2026, 7, 1, 8)) is None  # the end is outside


@pytest.mark.parametrize(
    "at, expected",
    [
        (local(LONDON, 2026, 7, 1, 21), local(LONDON, 2026, 7, 2, 8)),  # the start is inside
        (local(LONDON, 2026, 7, 1, 23, 30), local(LONDON, 2026, 7, 2, 8)),
        (local(LONDON, 2026, 7, 2, 3), local(LONDON, 2026, 7, 2, 8)),  # after midnight: the same day's end
        (local(LONDON, 2026, 7, 2, 7, 59, 59), local(LONDON, 2026, 7, 2, 8)),
    ],
)
def test_inside_the_window_the_release_is_its_end(at, expected):
    assert release(NIGHT, [LONDON], at) == expected


def test_a_window_not_crossing_midnight():
    lunch = QuietWindow(time(12), time(14))
    assert release(lunch, [LONDON], local(LONDON, 2026, 7, 1, 12, 30)) == local(LONDON, 2026, 7, 1, 14)
    assert release(lunch, [LONDON], local(LONDON, 2026, 7, 1, 23)) is None


@pytest.mark.parametrize(
    "to, at, expected",
    [
        # 22:00 UTC in July: London 23:00 (BST), quiet until 08:00 BST = 07:00 UTC.
        (UK, utc(2026, 7, 1, 22), utc(2026, 7, 2, 7)),
        # India (UTC+5:30, no DST): 16:00 UTC is 21:30 IST; 08:00 IST is 02:30 UTC.
        (INDIA, utc(2026, 7, 1, 16), utc(2026, 7, 2, 2, 30)),
        (INDIA, utc(2026, 7, 1, 15, 29), None),  # 20:59 IST
        # New York (EDT, UTC-4): 03:00 UTC is 23:00; 08:00 EDT is 12:00 UTC.
        (US_NEW_YORK, utc(2026, 7, 2, 3), utc(2026, 7, 2, 12)),
        # Sydney in January (AEDT, UTC+11): 12:00 UTC is 23:00; 08:00 AEDT is 21:00 UTC.
        (SYDNEY_LANDLINE, utc(2026, 1, 10, 12), utc(2026, 1, 10, 21)),
    ],
)
def test_numbers_in_several_countries(to, at, expected):
    zones = recipient_time_zones(channel="sms", to=to)
    assert release(NIGHT, zones, at) == expected


def test_a_number_in_several_zones_waits_for_the_last_of_them():
    """An Australian mobile number: Lord Howe (UTC+11 in January) to Cocos (UTC+6:30). The message
    goes only when it is outside 21:00–08:00 everywhere the number may be."""
    zones = recipient_time_zones(channel="sms", to=AUSTRALIA_MOBILE)
    # 10:00 UTC on 10 January: 21:00 in Sydney (quiet), 18:00 in Perth (not yet).
    at = utc(2026, 1, 10, 10)
    got = release(NIGHT, zones, at)
    # The westernmost zone ends last: Cocos, UTC+6:30, 08:00 local = 01:30 UTC.
    assert got == utc(2026, 1, 11, 1, 30)
    for zone in zones:
        assert not NIGHT.contains(got.astimezone(zone).time()), zone
    assert NIGHT.contains((got - timedelta(seconds=1)).astimezone(ZoneInfo("Indian/Cocos")).time())
    # A minute earlier it was 20:59 in Sydney and Lord Howe: outside everywhere.
    assert release(NIGHT, zones, at - timedelta(minutes=1)) is None


def test_zones_whose_windows_cover_the_whole_day_fall_back_to_each_window_ending_once():
    # UTC-10 and UTC+12 with a 21:00–08:00 window: 11 h quiet each, shifted by 22 h, leave no gap.
    honolulu, auckland = ZoneInfo("Pacific/Honolulu"), ZoneInfo("Pacific/Kiritimati")  # -10, +14
    wide = QuietWindow(time(18), time(8))  # 14 hours
    at = utc(2026, 7, 1, 5)  # 19:00 in Honolulu, 19:00 next day in Kiritimati: both inside
    got = release(wide, [honolulu, auckland], at)
    assert got is not None and got - at < timedelta(days=1)


# --- DST, both directions -----------------------------------------------------------------------


def test_spring_forward_in_new_york():
    """8 March 2026: at 02:00 EST the clock jumps to 03:00 EDT (07:00 UTC)."""
    # The usual window: the night is an hour shorter in UTC terms; 08:00 EDT is 12:00 UTC.
    assert release(NIGHT, [NEW_YORK], local(NEW_YORK, 2026, 3, 7, 22)) == utc(2026, 3, 8, 12)
    # A window ending in the gap (02:30 never shows): it ends when the clock jumps past it.
    gap_end = QuietWindow(time(1), time(2, 30))
    assert release(gap_end, [NEW_YORK], local(NEW_YORK, 2026, 3, 8, 1, 15)) == utc(2026, 3, 8, 7)
    # A window starting in the gap: from 03:00 EDT the clock is inside.
    gap_start = QuietWindow(time(2, 30), time(6))
    assert release(gap_start, [NEW_YORK], local(NEW_YORK, 2026, 3, 8, 1, 59)) is None
    assert release(gap_start, [NEW_YORK], utc(2026, 3, 8, 7)) == local(NEW_YORK, 2026, 3, 8, 6)


def test_fall_back_in_new_york():
    """1 November 2026: at 02:00 EDT the clock goes back to 01:00 EST (06:00 UTC); 01:00–02:00 shows twice."""
    # The usual window: an hour longer in UTC terms; 08:00 EST is 13:00 UTC.
    assert release(NIGHT, [NEW_YORK], local(NEW_YORK, 2026, 10, 31, 22)) == utc(2026, 11, 1, 13)
    # A window ending in the repeated hour ends when the clock first shows its end (01:30 EDT)...
    repeated = QuietWindow(time(0), time(1, 30))
    assert release(repeated, [NEW_YORK], local(NEW_YORK, 2026, 11, 1, 0, 30)) == utc(2026, 11, 1, 5, 30)
    # ...and a message tested during the second pass (01:10 EST) waits for the second 01:30.
    second_pass = utc(2026, 11, 1, 6, 10)
    assert second_pass.astimezone(NEW_YORK).replace(tzinfo=None) == datetime(2026, 11, 1, 1, 10)
    assert release(repeated, [NEW_YORK], local(NEW_YORK, 2026, 11, 1, 1, 10, fold=1)) == utc(2026, 11, 1, 6, 30)
    assert release(repeated, [NEW_YORK], second_pass) == utc(2026, 11, 1, 6, 30)
    # Between the two passes (01:40 EDT) the clock is outside.
    assert release(repeated, [NEW_YORK], utc(2026, 11, 1, 5, 40)) is None


@pytest.mark.parametrize(
    "at, expected",
    [
        # 29 March 2026, 01:00 GMT → 02:00 BST. 22:00 GMT on the 28th; 08:00 BST is 07:00 UTC.
        (utc(2026, 3, 28, 22), utc(2026, 3, 29, 7)),
        # 25 October 2026, 02:00 BST → 01:00 GMT. 21:00 UTC on the 24th is 22:00 BST; 08:00 GMT is 08:00 UTC.
        (utc(2026, 10, 24, 21), utc(2026, 10, 25, 8)),
    ],
)
def test_dst_changes_in_london(at, expected):
    assert release(NIGHT, [LONDON], at) == expected


def test_london_window_ending_in_the_spring_gap():
    gap_end = QuietWindow(time(0), time(1, 30))  # 01:30 does not exist on 29 March 2026
    assert release(gap_end, [LONDON], utc(2026, 3, 29, 0, 10)) == utc(2026, 3, 29, 1)


def test_local_instant_for_an_ordinary_a_repeated_and_a_missing_time():
    after = utc(2026, 1, 1)
    assert local_instant(datetime(2026, 7, 1).date(), time(8), LONDON, after=after) == utc(2026, 7, 1, 7)
    # Repeated: the earlier pass still to come.
    assert local_instant(datetime(2026, 11, 1).date(), time(1, 30), NEW_YORK, after=after) == utc(2026, 11, 1, 5, 30)
    assert local_instant(datetime(2026, 11, 1).date(), time(1, 30), NEW_YORK, after=utc(2026, 11, 1, 5, 45)) == utc(
        2026, 11, 1, 6, 30
    )
    # Missing: the transition.
    assert local_instant(datetime(2026, 3, 8).date(), time(2, 30), NEW_YORK, after=after) == utc(2026, 3, 8, 7)


# --- the policy: categories, exemptions, client override -----------------------------------------

EVERYWHERE = {"default": {"start": "00:00", "end": "23:59"}}


def policy_release(policy, *, priority="transactional", category="", channel="sms", to=UK, tz="", at=None):
    at = at or utc(2026, 7, 1, 22)
    return policy.release(priority=priority, category=category, channel=channel, to=to, timezone_name=tz, at=at)


@override_settings(CONDUCTOR={"QUIET_HOURS": {"default": {"start": "21:00", "end": "08:00"}, "otp": None}})
def test_the_setting_per_category_with_default():
    policy = quiet_hours_policy()
    assert policy_release(policy) == utc(2026, 7, 2, 7)
    assert policy_release(policy, category="otp") is None  # its own entry: none
    assert policy_release(policy, category="marketing") == utc(2026, 7, 2, 7)  # the default's


def test_no_setting_no_quiet_hours():
    assert policy_release(quiet_hours_policy()) is None


@override_settings(CONDUCTOR={"QUIET_HOURS": {"default": {"start": "21:00", "end": "08:00"}}})
def test_critical_is_exempt_unless_the_window_says_otherwise():
    assert policy_release(quiet_hours_policy(), priority="critical") is None
    assert policy_release(quiet_hours_policy(), priority="bulk") is not None
    strict = {"default": {"start": "21:00", "end": "08:00", "exempt_priorities": []}}
    assert policy_release(quiet_hours_policy(strict), priority="critical") == utc(2026, 7, 2, 7)
    with override_settings(
        CONDUCTOR={
            "QUIET_HOURS": {"default": {"start": "21:00", "end": "08:00"}},
            "QUIET_HOURS_EXEMPT_PRIORITIES": ["critical", "transactional"],
        }
    ):
        assert policy_release(quiet_hours_policy()) is None


@override_settings(CONDUCTOR={"QUIET_HOURS": {"default": {"start": "21:00", "end": "08:00"}}})
def test_a_client_configuration_replaces_the_setting():
    assert policy_release(quiet_hours_policy({})) is None  # the client has none
    later = {"default": {"start": "22:00", "end": "09:00"}}
    assert policy_release(quiet_hours_policy(later), at=utc(2026, 7, 1, 20, 30)) is None  # 21:30 BST
    assert policy_release(quiet_hours_policy(later), at=utc(2026, 7, 1, 21, 30)) == utc(2026, 7, 2, 8)


@override_settings(CONDUCTOR={"QUIET_HOURS": EVERYWHERE})
def test_an_email_or_unknown_number_keeps_quiet_hours_only_with_a_given_zone():
    policy = quiet_hours_policy()
    assert policy_release(policy, channel="email", to="a@example.com") is None
    assert policy_release(policy, to=US_UNKNOWN) is None
    assert policy_release(policy, channel="email", to="a@example.com", tz="Europe/London") is not None
    assert policy_release(policy, to=US_UNKNOWN, tz="America/Chicago") is not None


def test_the_client_field_is_validated_by_the_model():
    client = ApiClient(name="x", quiet_hours={"default": {"start": "21:00", "end": "8:00"}})
    with pytest.raises(ValidationError) as info:
        client.clean()
    assert "quiet_hours" in info.value.message_dict
    ApiClient(name="y", quiet_hours={"default": {"start": "21:00", "end": "08:00"}}).clean()
    ApiClient(name="z", quiet_hours=None).clean()


@pytest.mark.django_db
def test_the_admin_form_refuses_bad_quiet_hours():
    from messaging.admin import ApiClientForm

    form = ApiClientForm(data={"name": "n", "quiet_hours": '{"default": {"start": "21:00"}}', "api_rate": ""})
    assert not form.is_valid() and "quiet_hours" in form.errors
    form = ApiClientForm(
        data={"name": "n", "quiet_hours": '{"default": {"start": "21:00", "end": "08:00"}}', "api_rate": ""}
    )
    assert "quiet_hours" not in form.errors
