# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (lint + tests).
# Both set up what they need first: Debian packages (when apt-get exists) and a virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Real Fashion-MNIST (IDX files) and a real Prometheus + promtool for the deploy checks;
# chromium for the web console's browser test (Playwright drives it, headless); curl for the
# README's commands, which tests/test_docs.py runs.
APT_PACKAGES := dataset-fashion-mnist prometheus chromium curl

.PHONY: setup system-packages demo test lint bench

system-packages:
	@if command -v apt-get >/dev/null 2>&1; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	    $(APT_PACKAGES) >/dev/null; \
	else echo "no apt-get: Fashion-MNIST will be downloaded by torchvision; install prometheus yourself"; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: system-packages $(VENV)/.installed

demo: setup
	$(VENV)/bin/vaewatch demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# pytest's own exit code goes through: 5 (no tests collected) fails like any other error.
test: setup lint
	$(PY) -m pytest

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/worker_throughput.py
