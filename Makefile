# The README's two commands: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the build served from local disk on our machines (see README).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m zipper.demo

test: install
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/zipper bench table1 --json docs/table1.json

clean:
	rm -rf $(VENV)
