# Two foreign keys lose their own index, which a composite index already leading with the same
# column serves: messages by client ((client, created_at), (client, idempotency_key)) and attempts
# by message ((message, outcome)). Each index is written again by every new row version, so each
# costs every state change of every message (bench/README.md, fourth session).
#
# Only the indexes go: Django's AlterField would also drop and re-add the foreign key constraints,
# which re-checks every row of the table under lock. On PostgreSQL they are dropped CONCURRENTLY
# (and built so when going back), so the tables keep taking writes: a non-atomic migration.

import django.db.models.deletion
from django.db import migrations, models

INDEXES = [  # (table, index, column)
    ("messaging_message", "messaging_message_client_id_fb92923d", "client_id"),
    ("messaging_dispatchattempt", "messaging_dispatchattempt_message_id_475000ca", "message_id"),
]


def drop(apps, schema_editor):
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    for _table, index, _column in INDEXES:
        schema_editor.execute(f"DROP INDEX {concurrently}IF EXISTS {schema_editor.quote_name(index)}")


def create(apps, schema_editor):
    concurrently = "CONCURRENTLY " if schema_editor.connection.vendor == "postgresql" else ""
    quote = schema_editor.quote_name
    for table, index, column in INDEXES:
        schema_editor.execute(
            f"CREATE INDEX {concurrently}IF NOT EXISTS {quote(index)} ON {quote(table)} ({quote(column)})"
        )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("messaging", "0007_beat_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="dispatchattempt",
                    name="message",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="attempts",
                        to="messaging.message",
                    ),
                ),
                migrations.AlterField(
                    model_name="message",
                    name="client",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="messages",
                        to="messaging.apiclient",
                    ),
                ),
            ],
            database_operations=[migrations.RunPython(drop, create)],
        ),
    ]
