# The sweeper's indexes (accepted rows by priority and enqueue time, and by deadline) and the
# anomaly buckets' (attempts by end time): what beat reads every few seconds or every minute. On
# PostgreSQL they are built CONCURRENTLY, so a large message table keeps taking writes while they
# build (hence a non-atomic migration).

from django.db import migrations, models

INDEXES = [  # (model, index)
    (
        "message",
        models.Index(
            condition=models.Q(("state", "accepted")),
            fields=["priority", "enqueued_at", "next_attempt_at"],
            name="message_accepted_enqueued",
        ),
    ),
    (
        "message",
        models.Index(
            condition=models.Q(("expires_at__isnull", False), ("state", "accepted")),
            fields=["expires_at"],
            name="message_accepted_expiry",
        ),
    ),
    ("dispatchattempt", models.Index(fields=["ended_at"], name="attempt_ended")),
]


def create(apps, schema_editor):
    for model_name, index in INDEXES:
        model = apps.get_model("messaging", model_name)
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(index.create_sql(model, schema_editor, concurrently=True))
        else:
            schema_editor.add_index(model, index)


def drop(apps, schema_editor):
    for model_name, index in INDEXES:
        model = apps.get_model("messaging", model_name)
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(index.remove_sql(model, schema_editor, concurrently=True))
        else:
            schema_editor.remove_index(model, index)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("messaging", "0006_ordering"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name=model_name, index=index) for model_name, index in INDEXES],
            database_operations=[migrations.RunPython(create, drop)],
        )
    ]
