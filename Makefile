# Set-up on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv, install torch==2.13.0 first (the CPU wheel; a plain `torch` pulls a CUDA build),
# then this package with its test extras. Re-running is cheap: the install step is skipped when
# pyproject.toml has not changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dgdlens-installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dgdlens demo --out dgdlens-demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) dgdlens-demo .pytest_cache
