# Inbound messages (issue 22): one row per message a recipient sent us (STOP, START, HELP, other),
# unique per provider message id so a retried webhook does nothing twice; and the index that finds
# the client an inbound STOP belongs to (the latest message dispatched to that number on that
# channel). On PostgreSQL the index is built CONCURRENTLY, so a large message table keeps taking
# writes while it builds (hence a non-atomic migration, as 0007).

import django.db.models.deletion
from django.db import migrations, models

RECIPIENT_INDEX = models.Index(
    condition=models.Q(("dispatched_at__isnull", False)),
    fields=["channel", "to", "-dispatched_at"],
    name="message_recipient_dispatched",
)


def create_index(apps, schema_editor):
    model = apps.get_model("messaging", "message")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(RECIPIENT_INDEX.create_sql(model, schema_editor, concurrently=True))
    else:
        schema_editor.add_index(model, RECIPIENT_INDEX)


def drop_index(apps, schema_editor):
    model = apps.get_model("messaging", "message")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(RECIPIENT_INDEX.remove_sql(model, schema_editor, concurrently=True))
    else:
        schema_editor.remove_index(model, RECIPIENT_INDEX)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("messaging", "0016_suppressions"),
    ]

    operations = [
        migrations.CreateModel(
            name="InboundMessage",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("provider", models.CharField(max_length=32)),
                ("provider_message_id", models.CharField(max_length=128)),
                (
                    "channel",
                    models.CharField(
                        choices=[("sms", "Sms"), ("whatsapp", "Whatsapp"), ("email", "Email")], max_length=16
                    ),
                ),
                ("sender", models.CharField(max_length=64)),
                ("to", models.CharField(max_length=64)),
                ("keyword", models.CharField(blank=True, default="", max_length=16)),
                (
                    "action",
                    models.CharField(
                        choices=[
                            ("suppressed", "Suppressed"),
                            ("already_suppressed", "Already Suppressed"),
                            ("lifted", "Lifted"),
                            ("nothing_to_lift", "Nothing To Lift"),
                            ("help_replied", "Help Replied"),
                            ("help_not_sent", "Help Not Sent"),
                            ("unattributed", "Unattributed"),
                            ("none", "None"),
                        ],
                        max_length=24,
                    ),
                ),
                ("received_at", models.DateTimeField()),
                (
                    "client",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="inbound_messages",
                        to="messaging.apiclient",
                    ),
                ),
            ],
            options={
                "constraints": [
                    models.UniqueConstraint(
                        fields=("provider", "provider_message_id"), name="inbound_unique_provider_ref"
                    )
                ],
            },
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="message", index=RECIPIENT_INDEX)],
            database_operations=[migrations.RunPython(create_index, drop_index)],
        ),
    ]
