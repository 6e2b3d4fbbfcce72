"""The transition table: forward-only along the happy path, final states stay final."""

from messaging.states import (
    ALLOWED_SOURCES,
    DEAD_LETTER_STATES,
    FINAL_STATES,
    GUARDED_TRANSITIONS,
    SILENCE_FALLBACK_SOURCE,
    TRANSITIONS,
    transition_allowed,
)
from messaging.states import MessageState as S

HAPPY_PATH = [S.ACCEPTED, S.DISPATCHED, S.DELIVERED, S.READ]


def test_every_state_has_a_row():
    assert set(TRANSITIONS) == set(S.values)


def test_happy_path_moves_forward_and_may_skip_for_out_of_order_receipts():
    for i, source in enumerate(HAPPY_PATH):
        for j, target in enumerate(HAPPY_PATH):
            assert (target in TRANSITIONS[source]) == (j > i), (source, target)


def test_final_states_accept_nothing_but_a_replay_the_closing_of_a_dead_letter_or_a_silence_fallback():
    assert DEAD_LETTER_STATES == {S.FAILED, S.EXPIRED, S.DEAD_LETTERED}
    for state in FINAL_STATES:
        expected = {S.ACCEPTED, S.CANCELLED} if state in DEAD_LETTER_STATES else set()
        if state == S.UNDELIVERED:
            expected = {S.DISPATCHED}
        assert TRANSITIONS[state] == expected, state


def test_undelivered_goes_back_to_dispatched_only_for_the_silence_fallback():
    assert GUARDED_TRANSITIONS == {(S.UNDELIVERED, S.DISPATCHED): SILENCE_FALLBACK_SOURCE}
    for source in ("api", "worker", "sweeper", "webhook", "poll", "admin", "command"):
        assert not transition_allowed(from_state=S.UNDELIVERED, to_state=S.DISPATCHED, source=source)
    assert transition_allowed(from_state=S.UNDELIVERED, to_state=S.DISPATCHED, source=SILENCE_FALLBACK_SOURCE)


def test_a_replay_is_the_only_way_back_to_accepted():
    assert ALLOWED_SOURCES[S.ACCEPTED] == DEAD_LETTER_STATES


def test_only_accepted_messages_can_expire_or_be_dead_lettered():
    for target in (S.EXPIRED, S.DEAD_LETTERED):
        assert ALLOWED_SOURCES[target] == {S.ACCEPTED}


def test_cancelled_is_entered_before_dispatch_or_to_close_a_dead_letter():
    assert ALLOWED_SOURCES[S.CANCELLED] == {S.ACCEPTED} | DEAD_LETTER_STATES


def test_undelivered_and_failed_can_follow_dispatch_but_not_delivery():
    assert S.UNDELIVERED in TRANSITIONS[S.DISPATCHED]
    assert S.FAILED in TRANSITIONS[S.DISPATCHED]
    assert S.UNDELIVERED not in TRANSITIONS[S.DELIVERED]
    assert S.DELIVERED not in TRANSITIONS[S.READ]
