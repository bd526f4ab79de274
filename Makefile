# The README's two commands: `make demo` and `make test`. Each installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test bench

demo: $(VENV)/.installed
	$(VENV)/bin/fhir-sidecar demo

test: $(VENV)/.installed-test
	./scripts/system-deps.sh
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: $(VENV)/.installed
	$(PY) bench/run.py

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.created pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(VENV)/.installed $@
