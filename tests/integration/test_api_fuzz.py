"""The API driven by a schema-driven fuzzer (schemathesis) through real HTTP: whatever it sends,
valid by the schema or not, the answer is never a 5xx and always a status, content type and body
that /api/schema/ documents for the operation (issue 20)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Cases per operation and generation mode: 20 operations x 2 modes x these.
EXAMPLES = {GenerationMode.POSITIVE: 150, GenerationMode.NEGATIVE: 100}


ADDRESSES = {"sms": "+14155552671", "whatsapp": "whatsapp:+14155552671", "email": "ada@example.com"}


def addressed(body) -> None:
    """A recipient that fits the channel: the schema cannot say which goes with which, and without
    it nearly every valid message is refused (400) before it reaches the code that stores it."""
    if isinstance(body, dict) and body.get("channel") in ADDRESSES:
        body["to"] = ADDRESSES[body["channel"]]


def fuzz(operation, mode: GenerationMode, examples: int, send, record) -> None:
    """Send `examples` cases of one operation, generated in one mode, with a fixed seed."""

    # derandomize: the same cases every run; no shrinking, so every failure is kept as it was found.
    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        try:
            send(case, mode)
        except (Exception, FailureGroup) as exc:  # every failure is collected, then reported together
            record(f"{mode.value} {operation.label}: {str(exc)[:600]}")
        else:
            record(None)

    run()


def test_the_api_answers_only_what_its_schema_documents(live, client_key):
    schema = schemathesis.openapi.from_url(f"{live.web_url}/api/schema/?format=json", timeout=30)
    session = requests.Session()
    auth = {"Authorization": f"Bearer {client_key[1]}"}
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []

    def send(case, mode: GenerationMode) -> None:
        cases[case.operation.label] += 1
        if mode is GenerationMode.POSITIVE and case.operation.label == "POST /api/v1/messages/":
            addressed(case.body)
        response = case.call(base_url=live.web_url, session=session, headers=auth)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=auth)

    def record(failure: str | None) -> None:
        if failure is not None:
            failures.append(failure)

    started = time.monotonic()
    for result in schema.get_all_operations():
        for mode, examples in EXAMPLES.items():
            fuzz(result.ok(), mode, examples, send, record)
    elapsed = time.monotonic() - started
    print(f"schemathesis: {sum(cases.values())} cases in {elapsed:.0f} s, {len(failures)} failures")
    print(f"per operation: {dict(cases)}; statuses: {dict(sorted(statuses.items()))}")
    assert len(cases) == 20 and sum(cases.values()) >= 1000, cases
    assert failures == [], "\n\n".join(failures[:20])
