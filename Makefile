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
	# the real OPA engine (Go, as a C library) for policy parity tests: test-only, installed on its
	# own because its metadata claims Python >= 3.14 (it runs on 3.11; see DEPENDENCIES.md)
	$(PY) -m pip install -q --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4
	touch $(VENV)/.installed $@
