# The Receipt model, moved from the reconciliation app: reconciliation 0004 renamed its table to
# messaging_receipt, so this only takes it into messaging's state (no table is created), and moves
# its content type (admin permissions and log entries point at it) along with it.

import django.db.models.deletion
from django.db import migrations, models


def _move_content_type(apps, schema_editor, from_app, to_app):
    ContentType = apps.get_model("contenttypes", "ContentType")
    db = schema_editor.connection.alias
    if ContentType.objects.using(db).filter(app_label=to_app, model="receipt").exists():
        return  # already there (made by a post_migrate run); the old one has no rows worth keeping
    ContentType.objects.using(db).filter(app_label=from_app, model="receipt").update(app_label=to_app)


def forwards(apps, schema_editor):
    _move_content_type(apps, schema_editor, "reconciliation", "messaging")


def backwards(apps, schema_editor):
    _move_content_type(apps, schema_editor, "messaging", "reconciliation")


class Migration(migrations.Migration):

    dependencies = [
        ("contenttypes", "0002_remove_content_type_name"),
        ("messaging", "0008_redundant_fk_indexes"),
        ("reconciliation", "0004_receipt_moves_to_messaging"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name="Receipt",
                    fields=[
                        ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                        ("provider", models.CharField(max_length=32)),
                        ("event_id", models.CharField(max_length=200)),
                        ("provider_message_id", models.CharField(blank=True, default="", max_length=128)),
                        ("provider_status", models.CharField(max_length=64)),
                        ("mapped_state", models.CharField(blank=True, default="", max_length=16)),
                        ("error_code", models.CharField(blank=True, default="", max_length=64)),
                        ("applied", models.BooleanField(default=False)),
                        ("source", models.CharField(default="webhook", max_length=16)),
                        ("received_at", models.DateTimeField()),
                        ("payload", models.JSONField(default=dict)),
                        (
                            "message",
                            models.ForeignKey(
                                blank=True,
                                null=True,
                                on_delete=django.db.models.deletion.CASCADE,
                                related_name="receipts",
                                to="messaging.message",
                            ),
                        ),
                    ],
                    options={
                        "indexes": [
                            models.Index(fields=["provider", "provider_message_id"], name="receipt_provider_ref"),
                            models.Index(fields=["message", "received_at"], name="receipt_message_time"),
                        ],
                        "constraints": [
                            models.UniqueConstraint(
                                fields=("provider", "event_id"), name="receipt_unique_event_per_provider"
                            )
                        ],
                    },
                ),
            ],
        ),
        migrations.RunPython(forwards, backwards),
    ]
