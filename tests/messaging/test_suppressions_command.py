"""manage.py suppressions: import (dry run first), export, and the export imported back."""

from __future__ import annotations

import csv
import io

import pytest
from django.core.management import CommandError, call_command

from messaging.models import ApiClient, Suppression
from messaging.suppressions.services import suppression_add, suppression_lift

pytestmark = pytest.mark.django_db

NUMBER = "+14155552671"


def run(*args) -> str:
    out, err = io.StringIO(), io.StringIO()
    call_command("suppressions", *args, stdout=out, stderr=err)
    return out.getvalue() + err.getvalue()


@pytest.fixture
def acme():
    return ApiClient.objects.create(name="acme")


def test_import_dry_run_then_for_real_then_export_and_back_into_another_client(acme, tmp_path):
    source = tmp_path / "list.csv"
    source.write_text(
        "channel,address,scope,reason,note\n"
        f"sms,{NUMBER},,stop_keyword,texted STOP to the old number\n"
        "email,Ada@Example.com,news,unsubscribed,\n"
        "email,bob@example.com,,hard_bounce,\n"
        "sms,12345,,,\n",
        encoding="utf-8",
    )
    dry = run("import", "--client", "acme", str(source), "--dry-run")
    assert "Would add 3" in dry and "line 5, address" in dry and "nothing was stored" in dry
    assert not Suppression.objects.exists()
    done = run("import", "--client", "acme", str(source))
    assert "Added 3" in done and "1 bad line" in done
    assert run("import", "--client", "acme", str(source)).count("3 already suppressed") == 1
    assert Suppression.objects.get(address="bob@example.com").covers_exempt  # by its reason
    lifted = Suppression.objects.get(address=NUMBER)
    suppression_lift(suppression=lifted, reason="START")

    exported = tmp_path / "out.csv"
    assert "Wrote 3 suppression(s)" in run("export", "--client", "acme", "--output", str(exported))
    rows = list(csv.DictReader(exported.open(encoding="utf-8")))
    assert {r["address"] for r in rows} == {NUMBER, "ada@example.com", "bob@example.com"}
    assert [r["lifted_reason"] for r in rows if r["address"] == NUMBER] == ["START"]
    active_only = run("export", "--client", "acme", "--active-only")
    assert NUMBER not in active_only and "ada@example.com" in active_only

    ApiClient.objects.create(name="globex")
    back = run("import", "--client", "globex", str(exported))
    assert "Added 2" in back and "1 lifted row(s)" in back
    theirs = Suppression.objects.filter(client__name="globex")
    assert {(s.address, s.scope, s.reason) for s in theirs} == {
        ("ada@example.com", "news", "unsubscribed"),
        ("bob@example.com", "", "hard_bounce"),
    }


def test_errors_say_what_to_do(acme, tmp_path):
    with pytest.raises(CommandError, match="No API client named 'nobody'. Clients: acme"):
        run("export", "--client", "nobody")
    with pytest.raises(CommandError, match="Cannot read"):
        run("import", "--client", "acme", str(tmp_path / "missing.csv"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("channel,address,note\nsms,+14155552671,café\n".encode("latin-1"))
    with pytest.raises(CommandError, match="not UTF-8.*CSV UTF-8"):
        run("import", "--client", "acme", str(latin))
    headless = tmp_path / "headless.csv"
    headless.write_text(f"sms,{NUMBER}\n", encoding="utf-8")
    with pytest.raises(CommandError, match="header.*Nothing was imported"):
        run("import", "--client", "acme", str(headless))


def test_a_big_file_reports_progress_and_has_no_line_limit(acme, tmp_path):
    big = tmp_path / "big.csv"
    big.write_text("channel,address\n" + "".join(f"email,user{i}@example.com\n" for i in range(10_050)))
    output = run("import", "--client", "acme", str(big))
    assert "Added 10050" in output and "2000 of 10050 lines done" in output
    assert Suppression.objects.count() == 10_050
    suppression_add(client=acme, channel="sms", address=NUMBER, reason="manual")
