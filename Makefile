# Set-up on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv, install torch==2.13.0 first (the CPU wheel; a plain `torch` pulls a CUDA build),
# then this package with its test extras. Re-running is cheap: the install step is skipped when
# pyproject.toml has not changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dgdlens-installed
DOCS_STAMP := $(VENV)/.dgdlens-docs-installed

.PHONY: install demo test bench clean docs

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

# `make docs`: the Sphinx site in docs/_build/html (warnings are errors), then an offline check of its
# internal links. Tutorials are executed; their outputs are cached in docs/.jupyter_cache, so a
# re-build only re-runs a tutorial whose source changed.
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html
	$(PY) docs/check_links.py docs/_build/html

clean:
	rm -rf $(VENV) dgdlens-demo .pytest_cache docs/_build docs/.jupyter_cache docs/api/generated docs/cli_generated.md
