# Two commands on a fresh machine:  `make run`  (the default job)  and  `make test`.
# Each creates or refreshes .venv from pyproject.toml by itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LAKE   ?= lake
WORKDIR ?= runs/digits_cnn
# pytest-xdist workers for `make test`: one per usable CPU, at most 4 (each holds jax with 8 simulated devices)
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; n = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(); print(max(1, min(4, n or 1)))")

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lepton-jax lake ingest --lake $(LAKE) --source digits --table digits
	$(BIN)/lepton-jax train --config configs/digits_cnn.py --workdir $(WORKDIR) --lake $(LAKE)

test: $(STAMP)
	$(BIN)/ruff check lepton_jax tests configs scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: $(STAMP)
	$(BIN)/ruff check lepton_jax tests configs scripts


clean:
	rm -rf $(VENV) runs lake
