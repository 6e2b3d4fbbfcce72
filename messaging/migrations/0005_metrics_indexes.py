# Indexes for /metrics' per-scrape counts. On PostgreSQL they are built CONCURRENTLY, so a large
# message table keeps taking writes while they build (hence a non-atomic migration).

from django.db import migrations, models

INDEXES = [
    models.Index(fields=["channel", "provider", "state"], name="message_route_state"),
    models.Index(
        condition=models.Q(("receipt_unknown_at__isnull", False), ("state", "dispatched")),
        fields=["channel", "provider"],
        name="message_delivery_unknown",
    ),
]


def create(apps, schema_editor):
    model = apps.get_model("messaging", "Message")
    for index in INDEXES:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(index.create_sql(model, schema_editor, concurrently=True))
        else:
            schema_editor.add_index(model, index)


def drop(apps, schema_editor):
    model = apps.get_model("messaging", "Message")
    for index in INDEXES:
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(index.remove_sql(model, schema_editor, concurrently=True))
        else:
            schema_editor.remove_index(model, index)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("messaging", "0004_receipt_follow_up"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="message", index=index) for index in INDEXES],
            database_operations=[migrations.RunPython(create, drop)],
        )
    ]
