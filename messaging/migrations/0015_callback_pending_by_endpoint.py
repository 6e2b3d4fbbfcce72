# The deliverer's claim reads pending callbacks endpoint by endpoint, so that an endpoint left out
# (at its limit, circuit open) costs one probe rather than a read of its backlog. On PostgreSQL the
# index is built CONCURRENTLY, so a large callback table keeps taking writes (a non-atomic migration).

from django.db import migrations, models

INDEX = models.Index(
    condition=models.Q(("state", "pending")),
    fields=["endpoint", "next_attempt_at"],
    name="callback_pending_by_endpoint",
)


def create(apps, schema_editor):
    model = apps.get_model("messaging", "callback")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(INDEX.create_sql(model, schema_editor, concurrently=True))
    else:
        schema_editor.add_index(model, INDEX)


def drop(apps, schema_editor):
    model = apps.get_model("messaging", "callback")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(INDEX.remove_sql(model, schema_editor, concurrently=True))
    else:
        schema_editor.remove_index(model, INDEX)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("messaging", "0014_callback_claim_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="callback", index=INDEX)],
            database_operations=[migrations.RunPython(create, drop)],
        )
    ]
