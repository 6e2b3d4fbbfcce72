"""docs/systemd/ (docs/deployment-systemd.md) runs what the Procfile lists, as the Procfile runs it,
each unit restarted when it fails and grouped under conductor.target (no systemd needed, but
`systemd-analyze verify` checks the files where it is installed)."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "docs" / "systemd"
INSTALL_DIR = "/opt/conductor"


# These tests only read files: keep the suite's autouse Redis fixtures (tests/conftest.py) out of them.
@pytest.fixture(autouse=True)
def _clean_redis():
    yield


@pytest.fixture(autouse=True)
def _fresh_provider_state():
    yield


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(":", 1) for line in lines if re.match(r"^[a-z_]+:", line))


def unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str
    parser.read_string(path.read_text())
    return parser


def unit_path(process: str) -> Path:
    return UNITS / f"conductor-{process.replace('_', '-')}.service"


def test_one_unit_per_procfile_process_and_no_other():
    expected = {unit_path(name).name for name in procfile()} | {"conductor-setup.service"}
    assert {path.name for path in UNITS.glob("*.service")} == expected
    assert (UNITS / "conductor.target").exists()


@pytest.mark.parametrize("process", sorted(procfile()))
def test_unit_runs_the_procfile_command_and_restarts_on_failure(process):
    """ExecStart is the Procfile's command with the virtualenv's executable, ports at their
    defaults, `nice -n` as Nice= and `env -u` as UnsetEnvironment= (systemd's own settings)."""
    command = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", procfile()[process])
    args = shlex.split(command)
    expected = {}
    if args[:2] == ["nice", "-n"]:
        expected["Nice"], args = args[2], args[3:]
    if args[:2] == ["env", "-u"]:
        expected["UnsetEnvironment"], args = args[2], args[3:]
    parsed = unit(unit_path(process))
    service = parsed["Service"]
    exec_start = shlex.split(service["ExecStart"].replace("%%", "%"))
    assert exec_start == [f"{INSTALL_DIR}/.venv/bin/{args[0]}", *args[1:]]
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert "Nice" in expected or "Nice" not in service
    assert service["Restart"] == "on-failure" and float(service["RestartSec"]) > 0
    assert service["KillMode"] == "mixed"
    assert service["EnvironmentFile"] == "/etc/conductor/conductor.env"
    assert service["WorkingDirectory"] == INSTALL_DIR
    assert parsed["Unit"]["PartOf"] == "conductor.target"
    assert parsed["Unit"]["StartLimitIntervalSec"] == "0"  # never gives up
    assert "conductor-setup.service" in parsed["Unit"]["Requires"].split()
    assert parsed["Install"]["WantedBy"] == "conductor.target"


def test_setup_unit_empties_the_metrics_directory_the_env_file_names():
    setup = unit(UNITS / "conductor-setup.service")["Service"]
    assert setup["Type"] == "oneshot" and setup["RemainAfterExit"] == "yes"
    assert setup["RuntimeDirectory"] == "conductor-metrics"
    env = dict(line.split("=", 1) for line in (UNITS / "conductor.env.example").read_text().splitlines() if "=" in line)
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/run/conductor-metrics"
    assert "LOG_FORMAT" not in env  # services log JSON, the default


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    """systemd's own parser: no unknown keys, no bad values (the paths point at this checkout's venv)."""
    venv = ROOT / ".venv"
    for path in [*UNITS.glob("*.service"), UNITS / "conductor.target"]:
        text = path.read_text().replace(f"{INSTALL_DIR}/.venv", str(venv)).replace(INSTALL_DIR, str(ROOT))
        (tmp_path / path.name).write_text(text)
    files = sorted(str(path) for path in tmp_path.iterdir())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *files], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
