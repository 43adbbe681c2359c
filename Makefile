# Two commands do all the set-up on a fresh machine:
#   make episode   set up, then render the sample episode on the embedded default
#   make test      set up, then run the test suite (what CI runs)
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
SAMPLE  ?= examples/episode_en.fountain
PROFILE ?= draft
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: setup episode episodes test bench clean

$(BIN)/anim: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/anim

episode: setup
	$(BIN)/anim render $(SAMPLE) --profile $(PROFILE)

episodes: setup
	$(BIN)/anim render examples/episode_en.fountain --profile $(PROFILE)
	$(BIN)/anim render examples/episode_zh.fountain --profile $(PROFILE) --aspect 9:16

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python experiments/bench_render.py

clean:
	rm -rf out renders .pytest_cache
