"""Receipts moved from the reconciliation app to messaging: their rows (and content type) move with
them, forwards and backwards (migrations reconciliation 0004 and messaging 0009)."""

from datetime import UTC, datetime

import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import IntegrityError, connection
from django.db.migrations.executor import MigrationExecutor

from messaging.models import Receipt

BEFORE = [("messaging", "0008_redundant_fk_indexes"), ("reconciliation", "0003_dashboard_series")]
AFTER = [("messaging", "0009_receipt_from_reconciliation"), ("reconciliation", "0004_receipt_moves_to_messaging")]


def _migrate(targets):
    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return MigrationExecutor(connection).loader.project_state(targets).apps


def _tables() -> set[str]:
    return set(connection.introspection.table_names())


@pytest.mark.django_db(transaction=True)
def test_receipts_keep_their_rows_across_the_move_forwards_and_backwards(make_message):
    message = make_message()
    content_type = ContentType.objects.get(app_label="messaging", model="receipt")
    try:
        old_apps = _migrate(BEFORE)
        assert "reconciliation_receipt" in _tables() and "messaging_receipt" not in _tables()
        assert ContentType.objects.get(pk=content_type.pk).app_label == "reconciliation"
        OldReceipt = old_apps.get_model("reconciliation", "Receipt")
        OldReceipt.objects.create(
            provider="twilio",
            event_id="SM1:delivered",
            message_id=message.pk,
            provider_message_id="SM1",
            provider_status="delivered",
            mapped_state="delivered",
            received_at=datetime(2026, 12, 1, tzinfo=UTC),
            payload={"MessageStatus": "delivered"},
        )

        moved_apps = _migrate(AFTER)
        assert "messaging_receipt" in _tables() and "reconciliation_receipt" not in _tables()
        MovedReceipt = moved_apps.get_model("messaging", "Receipt")
        moved = MovedReceipt.objects.get(event_id="SM1:delivered")
        assert (moved.message_id, moved.provider_status, moved.payload) == (
            message.pk,
            "delivered",
            {"MessageStatus": "delivered"},
        )
        assert ContentType.objects.get(pk=content_type.pk).app_label == "messaging"
        # The unique constraint came along: the same provider event cannot be stored twice.
        with pytest.raises(IntegrityError):
            MovedReceipt.objects.create(
                provider="twilio", event_id="SM1:delivered", provider_status="delivered", received_at=moved.received_at
            )

        old_apps = _migrate(BEFORE)
        back = old_apps.get_model("reconciliation", "Receipt").objects.get(event_id="SM1:delivered")
        assert back.message_id == message.pk
    finally:
        _migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
    # 0010: receipts stored before batched intake were applied as they came: none is left pending.
    kept = Receipt.objects.get(event_id="SM1:delivered")
    assert kept.processed_at == kept.received_at and kept.message_ref == message.pk and not kept.unmatched_reason
