# The two commands of the README, each one line that installs what it needs first:
#   make sst2    fine-tune all-MiniLM-L6-v2 on SST-2 from ../shared (the main job)
#   make test    the tests: the fast tier, then the slow one (multi-process, end-to-end, launchers)
# The environment is a virtualenv in .venv, made on first use from pyproject.toml (torch first and pinned, so that no
# dependency pulls in another build; which build pip takes is pip's configuration: see docs/development.md).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: sst2 test test-fast test-slow env

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

sst2: env
	$(VENV)/bin/accelerate launch bert_dist/run.py --task sst2 --init $(SHARED)/models/all-MiniLM-L6-v2 \
		--data-dir $(SHARED)/data --mixed-precision bf16 --group-by-length --lr 5e-5 --epochs 1

test: test-fast test-slow

test-fast: env
	$(PY) -m pytest -q -p no:cacheprovider

test-slow: env
	$(PY) -m pytest -q -p no:cacheprovider -m slow
