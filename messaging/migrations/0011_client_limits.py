"""Per-client limits (API rate, daily quotas per channel, allowed priorities) and the index of
the fair bulk claim (issue 20). On PostgreSQL the index is built CONCURRENTLY, so a large message
table keeps taking writes while it builds (hence a non-atomic migration), as in 0007."""

from django.db import migrations, models

import messaging.models

FAIR_INDEX = models.Index(
    condition=models.Q(("priority", "bulk"), ("sequence__isnull", True), ("state", "accepted")),
    fields=["channel", "client", "created_at"],
    name="message_bulk_fair",
)


def create(apps, schema_editor):
    model = apps.get_model("messaging", "message")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FAIR_INDEX.create_sql(model, schema_editor, concurrently=True))
    else:
        schema_editor.add_index(model, FAIR_INDEX)


def drop(apps, schema_editor):
    model = apps.get_model("messaging", "message")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FAIR_INDEX.remove_sql(model, schema_editor, concurrently=True))
    else:
        schema_editor.remove_index(model, FAIR_INDEX)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("messaging", "0010_receipt_intake"),
    ]

    operations = [
        migrations.AddField(
            model_name="apiclient",
            name="api_rate",
            field=models.CharField(
                blank=True,
                default="",
                help_text="API requests allowed, as DRF writes a rate: 100/s, 3000/min, 'none' for no limit. "
                "Blank: the API_RATE setting.",
                max_length=32,
                validators=[messaging.models.validate_api_rate],
            ),
        ),
        migrations.AddField(
            model_name="apiclient",
            name="sms_daily_quota",
            field=models.PositiveIntegerField(
                blank=True, help_text="SMS messages accepted per UTC day. Blank: the DAILY_QUOTA setting.", null=True
            ),
        ),
        migrations.AddField(
            model_name="apiclient",
            name="whatsapp_daily_quota",
            field=models.PositiveIntegerField(
                blank=True,
                help_text="WhatsApp messages accepted per UTC day. Blank: the DAILY_QUOTA setting.",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="apiclient",
            name="email_daily_quota",
            field=models.PositiveIntegerField(
                blank=True, help_text="Emails accepted per UTC day. Blank: the DAILY_QUOTA setting.", null=True
            ),
        ),
        migrations.AddField(
            model_name="apiclient",
            name="allowed_priorities",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text='Priorities this client may send, e.g. ["transactional", "bulk"]. '
                "Empty: the ALLOWED_PRIORITIES setting.",
                validators=[messaging.models.validate_priorities],
            ),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="message", index=FAIR_INDEX)],
            database_operations=[migrations.RunPython(create, drop)],
        ),
    ]
