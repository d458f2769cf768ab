# The README's two commands: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the build served from local disk on our machines (see README).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast test-isa lint install lock bench clean

# uv installs what pip would, a third of the time (parallel downloads and unpacking; docs/reproducibility.md).
# It reads no pip configuration: the extra indexes pip is configured with are passed on, and the best
# version across all indexes wins, as with pip.
UV := uv==0.13.9
PIP_INDEXES := $(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null)
UV_INDEXES := --index-strategy unsafe-best-match $(foreach index,$(PIP_INDEXES),--extra-index-url $(index))

# requirements.lock pins every package of the stack (resolved for Linux x86-64, Python 3.11); the install
# takes exactly those versions. After changing a dependency in pyproject.toml: `make lock`.
$(VENV)/bin/uv:
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(UV)

$(VENV)/.installed: pyproject.toml requirements.lock $(VENV)/bin/uv
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode $(UV_INDEXES) -r requirements.lock -e '.[dev]'
	touch $@

install: $(VENV)/.installed

lock: $(VENV)/bin/uv
	printf '%s\n' $(TORCH) | $(VENV)/bin/uv pip compile -q pyproject.toml - --extra dev $(UV_INDEXES) \
		--python-version 3.11 --custom-compile-command "make lock" -o requirements.lock

# The whole pipeline on the embedded default data, then the results and where to look next.
demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc repro
	@DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc push -q
	@echo; cat reports/table.md; echo
	@remote=$$(DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc remote default); \
	echo "Pushed:    every output to DVC remote '$$remote' ($$(DVC_NO_ANALYTICS=1 $(VENV)/bin/dvc config remote.$$remote.url); see docs/remote.md)"
	@echo "Plots:     reports/accuracy.png reports/ratios.png   (or: $(VENV)/bin/dvc plots show)"
	@echo "MLflow UI: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"
	@echo "Promote:   $(VENV)/bin/zipper promote --max-drop 1.0   (registers the deepest depth within 1 point as @champion)"

# Two worker processes, each test file on one of them (module fixtures such as the Prefect server and the
# tiny projects are built once): about two thirds of the serial time on 2 cores (README, Development).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Everything but the end-to-end runs (seconds to minutes each): about a third of `make test`.
# The unit tier: nothing that trains, runs the pipeline or starts processes, servers or stores.
test-fast: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load -m "not slow and not trains and not spawns"

# The fast tier and every training-dependent test once per CPU kernel path this machine can emulate.
test-isa: install
	$(PY) tests/kernel_paths.py

lint: install
	$(VENV)/bin/ruff check zipper tests benchmarks
	$(VENV)/bin/ruff format --check zipper tests benchmarks
	$(VENV)/bin/mypy

bench: install
	$(VENV)/bin/zipper bench table1 --markdown docs/table1.md --json docs/table1.json

clean:
	rm -rf $(VENV)
