# privasr front door: `make demo` runs the main job, `make test` runs the tests.
# Both install what they need: Debian packages (espeak-ng, sox, text corpora, test audio),
# a virtualenv in .venv, torch==2.13.0 pinned in the same pip call as the package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
APT_PKGS := espeak-ng sox bible-kjv bible-kjv-text dict-devil pocketsphinx-testdata wamerican miscfiles
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup apt demo demo-quick test test-all bench clean

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; fi

$(VENV)/.stamp-install: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.13.0" -e ".[dev,hf]"
	touch $@

setup: apt $(VENV)/.stamp-install

demo: setup
	$(BIN)/privasr demo

demo-quick: setup
	$(BIN)/privasr demo --quick

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ""

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs
