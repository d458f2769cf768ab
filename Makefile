# The README's two commands: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the build served from local disk on our machines (see README).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast test-isa install bench clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The whole pipeline on the embedded default data, then the results and where to look next.
demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc repro
	@DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc push -q
	@echo; cat reports/table.md; echo
	@remote=$$(DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc remote default); \
	echo "Pushed:    every output to DVC remote '$$remote' ($$(DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc config remote.$$remote.url); see docs/remote.md)"
	@echo "Plots:     reports/accuracy.png reports/ratios.png   (or: $(VENV)/bin/dvc plots show)"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"
	@echo "Promote:   $(VENV)/bin/zipper promote --max-drop 1.0   (puts alias @champion on the deepest depth within 1 point)"

test: install
	$(PY) -m pytest -q

# Everything but the end-to-end runs (seconds to minutes each): about a third of `make test`.
test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The fast tier and every training-dependent test once per CPU kernel path this machine can emulate.
test-isa: install
	$(PY) tests/kernel_paths.py

bench: install
	$(VENV)/bin/zipper bench table1 --json docs/table1.json

clean:
	rm -rf $(VENV)
