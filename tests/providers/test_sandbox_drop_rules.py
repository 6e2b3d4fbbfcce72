"""The sandbox's per-prefix silent drops (issue 24's "30 % of Twilio messages to one country"),
through Conductor's own provider adapters: accepted as usual, never delivered, to that prefix only."""

from __future__ import annotations

import pytest

from providers.registry import get_provider
from tests.providers.contract import send_request

BRITISH, AMERICAN = "+447400123456", "+14155552671"


@pytest.mark.parametrize("provider", ["twilio", "vonage"])
def test_a_drop_rule_drops_one_prefix_and_nothing_else(sandbox, provider) -> None:
    sandbox.faults(provider, drop_rules=[{"prefix": "+44", "rate": 1.0}], receipt_delay_ms=0)
    adapter = get_provider(provider)
    to_gb = [send_request(BRITISH) for _ in range(5)]
    to_us = [send_request(AMERICAN) for _ in range(5)]
    for request in to_gb + to_us:
        adapter.send(request)  # every one accepted: the drop is silent
    faults = {r.to: {logged["fault"] for logged in sandbox.requests(message_id=r.message_id)} for r in to_gb + to_us}
    assert faults == {BRITISH: {"drop"}, AMERICAN: {"none"}}


def test_a_partial_drop_rule_drops_about_its_share(sandbox) -> None:
    sandbox.faults("twilio", drop_rules=[{"prefix": "+44", "rate": 0.3}], receipt_delay_ms=0)
    adapter = get_provider("twilio")
    requests = [send_request(BRITISH) for _ in range(100)]
    for request in requests:
        adapter.send(request)
    dropped = sum(sandbox.requests(message_id=r.message_id)[0]["fault"] == "drop" for r in requests)
    assert 10 <= dropped <= 50  # 30 expected; the sandbox's seeded dice
