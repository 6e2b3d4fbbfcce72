"""The metric families the Grafana dashboard and docs/metrics.md rely on are the ones /metrics
really exports (tests/test_docker_files.py checks the dashboard against the same list)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_docker_files import WEB_METRICS_ENDPOINT

pytestmark = pytest.mark.django_db


def test_every_documented_family_is_exported_with_its_type_and_labels(client):
    import messaging.metrics  # noqa: F401  (the event families exist once the module is loaded)

    text = client.get("/metrics").content.decode()
    exported = {family.name: family for family in text_string_to_metric_families(text)}
    for name, (kind, labels) in WEB_METRICS_ENDPOINT.items():
        family = exported.get(name.removesuffix("_total"))
        assert family is not None, f"{name} is not exported"
        assert family.type == kind, (name, family.type)
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                assert set(sample.labels) == labels | {"le"}, (name, sample.labels)
            else:
                assert set(sample.labels) == labels, (name, sample.labels)
