# The two README commands. Both set up .venv/ first (idempotent: a second run reuses it).
PY := .venv/bin/python
PORT ?= 30000
ARGS ?=

.PHONY: setup serve test test-fast

setup:
	bash scripts/setup_env.sh

serve: setup
	$(PY) -m sglang_mux.launch_server --port $(PORT) $(ARGS)

test: setup
	$(PY) -m pytest -q --durations=15 $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not server" $(ARGS)
