"""Environment readers: typed values, and a clear error naming the variable when one is wrong."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from conductor_project.env import env_clock, env_json


def test_a_time_of_day(monkeypatch):
    assert env_clock("CONDUCTOR_TEST_AT", "02:00") == (2, 0)
    monkeypatch.setenv("CONDUCTOR_TEST_AT", "23:45")
    assert env_clock("CONDUCTOR_TEST_AT", "02:00") == (23, 45)
    for bad in ("24:00", "2am", "12:60"):
        monkeypatch.setenv("CONDUCTOR_TEST_AT", bad)
        with pytest.raises(ImproperlyConfigured, match="CONDUCTOR_TEST_AT"):
            env_clock("CONDUCTOR_TEST_AT", "02:00")


def test_a_json_object(monkeypatch):
    assert env_json("CONDUCTOR_TEST_JSON", {}) == {}
    monkeypatch.setenv("CONDUCTOR_TEST_JSON", '{"min_samples": 50}')
    assert env_json("CONDUCTOR_TEST_JSON", {}) == {"min_samples": 50}
    for bad in ("{nope", "[1, 2]"):
        monkeypatch.setenv("CONDUCTOR_TEST_JSON", bad)
        with pytest.raises(ImproperlyConfigured, match="CONDUCTOR_TEST_JSON"):
            env_json("CONDUCTOR_TEST_JSON", {})
