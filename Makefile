# Two commands do all the set-up on a fresh machine:
#   make episode   set up, then render the sample episode on the embedded default
#   make test      set up (with the generative extras the tests exercise), then run the test suite
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
SAMPLE  ?= examples/episode_en.fountain
PROFILE ?= draft
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: setup setup-test browser episode episodes test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Base install: what the main job needs (no torch).
$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Test install: + pytest, + torch/diffusers for the RIFE and diffusers tests (CPU build of torch).
$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev,gen]'
	touch $(VENV)/.base $@

setup: $(VENV)/.base
setup-test: $(VENV)/.test browser

# The browser test (tests/test_service_browser.py) drives Debian's chromium; Playwright cannot
# download its own browsers here. Only the test set-up installs it: `make episode` needs no browser.
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y --no-install-recommends chromium)

episode: setup
	$(BIN)/anim render $(SAMPLE) --profile $(PROFILE)

episodes: setup
	$(BIN)/anim render examples/episode_en.fountain --profile $(PROFILE)
	$(BIN)/anim render examples/episode_zh.fountain --profile $(PROFILE) --aspect 9:16

test: setup-test
	$(BIN)/python -m pytest -q --durations=20

bench: setup
	$(BIN)/python experiments/bench_render.py

clean:
	rm -rf out renders .pytest_cache
