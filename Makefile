# Set-up on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv, install torch==2.13.0 first (the CPU wheel; a plain `torch` pulls a CUDA build),
# then this package with its test extras. Re-running is cheap: the install step is skipped when
# pyproject.toml has not changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dgdlens-installed
DOCS_STAMP := $(VENV)/.dgdlens-docs-installed

.PHONY: install demo test test-newest bench clean docs

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

# `make test-newest`: the tests again in .venv-newest, under the newest Python 3.12+ this machine has, with
# what a fresh install resolves there (anndata 0.13, pandas 3, mudata 0.4 when this was written; 3.11 stops
# at anndata 0.12 and pandas 2). Skipped when there is none. No CPU wheel of torch 2.13.0 exists for it
# on this machine's registry, so it takes the CUDA build (about 5 GB, runs on the CPU).
NEWEST_PYTHON ?= $(shell for p in python3.14 python3.13 python3.12 $$(ls -d $$HOME/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -V -r); do $$p -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1 && echo $$p && break; done)

test-newest:
	@if [ -z "$(NEWEST_PYTHON)" ]; then echo "test-newest: no Python 3.12 or newer here, skipped"; \
	else $(MAKE) test VENV=.venv-newest PYTHON=$(NEWEST_PYTHON); fi

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
	rm -rf $(VENV) .venv-newest dgdlens-demo .pytest_cache docs/_build docs/.jupyter_cache docs/api/generated docs/cli_generated.md
