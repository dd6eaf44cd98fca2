# Two entry points: `make demo` and `make test`. Each creates .venv and installs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo demo-script demo-cli test lint bench bench-smoke clean

$(BIN)/loom-ops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/loom-ops

# The sandbox: the real bot in a local chat page (prints its URL; Ctrl-C stops it).
demo: $(BIN)/loom-ops
	$(BIN)/loom-ops sandbox --mock-llm --db .loom-ops/sandbox.sqlite

# The same incident flow played by itself through the page's API (what CI checks).
demo-script: $(BIN)/loom-ops
	$(BIN)/loom-ops sandbox --mock-llm --db .loom-ops/sandbox.sqlite --port 0 --script incident

# The CLI walk-through: a run stops for approval, is approved, and prints its summary.
demo-cli: $(BIN)/loom-ops
	$(BIN)/python -m agent.frontends.demo

test: $(BIN)/loom-ops
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache
	# Compiled once here: the suite starts hundreds of loom-ops processes, and where
	# PYTHONDONTWRITEBYTECODE is set each would compile the package again (about 50 ms).
	$(BIN)/python -m compileall -q agent bot
	$(BIN)/python -m pytest -q -n 2; code=$$?; if [ $$code -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$code

bench: $(BIN)/loom-ops
	$(BIN)/python bench/kernel.py --against --instructions
	$(BIN)/python bench/redaction.py
	$(BIN)/python bench/supervise.py
	$(BIN)/python bench/bot.py
	$(BIN)/python bench/http.py
	$(BIN)/python bench/scale.py --against
	$(BIN)/python bench/decision.py
	$(BIN)/python bench/soak.py

# Every benchmark once at a tiny size (about 30 s, and about 45 s more the first time, to make
# the baseline of --against): what CI runs so that none rots unnoticed. Its figures mean
# nothing at these sizes.
bench-smoke: $(BIN)/loom-ops
	$(BIN)/python bench/kernel.py --big 20 --small 5 --live 2 --against
	$(BIN)/python bench/redaction.py --steps 10
	$(BIN)/python bench/supervise.py --runs 1
	$(BIN)/python bench/bot.py --runs 2 --concurrent 2
	$(BIN)/python bench/http.py --runs 50 --streams 5 --clients 2 --incidents 2 --seconds 0.5
	$(BIN)/python bench/scale.py --quick --runs 4 --workers 1 --rounds 1 --against
	$(BIN)/python bench/decision.py --runs 2

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
