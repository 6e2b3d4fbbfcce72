# Receipts belong to the messaging app now (a message's lifecycle, receipts included, is one app's).
# The table is renamed and the model leaves this app's state; messaging 0009 takes it into its own
# state over the same rows. Backwards renames the table back.

from django.db import migrations


class Migration(migrations.Migration):

    dependencies = [
        ("messaging", "0008_redundant_fk_indexes"),
        ("reconciliation", "0003_dashboard_series"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.AlterModelTable(name="Receipt", table="messaging_receipt")],
            state_operations=[migrations.DeleteModel(name="Receipt")],
        ),
    ]
