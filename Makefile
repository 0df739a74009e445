# The README's commands. Each target creates the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/dense_lm
EXTRAS ?= test,hf

.PHONY: train test lint bench venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py --config configs/dense_lm.py --workdir $(WORKDIR)
	$(PY) evaluate.py --config configs/dense_lm.py --workdir $(WORKDIR)

test: venv
	$(PY) -m pytest -n 2 -q --durations=15 tests

# ruff, configured in pyproject.toml (CONTRIBUTING.md, "Formatting and lint"); CI runs it before the tests.
lint: venv
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# CPU-sized benchmarks; on a GPU or TPU run bench/gmm.py and bench/moe_layer.py without --small.
bench: venv
	$(PY) bench/gmm.py --small
	$(PY) bench/moe_layer.py --small
	$(PY) bench/blockffn.py
	$(PY) bench/mor_decode.py
	$(PY) bench/readme_cache.py

clean:
	rm -rf $(VENV) workdirs
