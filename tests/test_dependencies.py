"""Every installed version is locked: constraints.txt pins the whole tree requirements*.txt pull in,
agrees with their own pins, and every install (make venv, the image) goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-r "):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not pinned with =="
        found[canonical(match.group(1))] = match.group(3)
    return found


# These tests only read files: keep the suite's autouse Redis fixtures (tests/conftest.py) out of them.
@pytest.fixture(autouse=True)
def _clean_redis():
    yield


@pytest.fixture(autouse=True)
def _fresh_provider_state():
    yield


def test_constraints_pin_every_requirement_at_the_same_version():
    locked = pins(ROOT / "constraints.txt")
    for requirements in ("requirements.txt", "requirements-dev.txt"):
        for name, version in pins(ROOT / requirements).items():
            assert locked.get(name) == version, f"{requirements}: {name}=={version}; locked: {locked.get(name)}"


def test_constraints_pin_the_installed_transitive_dependencies():
    from importlib import metadata

    locked = pins(ROOT / "constraints.txt")
    # A few of what the direct requirements pull in: Django's, Celery's, requests'.
    for name in ("asgiref", "sqlparse", "kombu", "billiard", "vine", "urllib3", "idna", "certifi"):
        assert name in locked, f"{name} is not locked"
    for name, version in locked.items():
        installed = metadata.version(name)
        assert installed == version, f"constraints.txt locks {name}=={version}; installed: {installed}"


def test_every_install_goes_through_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "-r requirements" in line]
    venv = [line for line in installs if "$(BIN)" in line]
    assert venv and all("-c constraints.txt" in line for line in venv), venv
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -r requirements.txt -c constraints.txt" in dockerfile
    assert re.search(r"^COPY requirements.txt constraints.txt ", dockerfile, re.MULTILINE)
