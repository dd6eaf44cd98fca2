# Two entry points: `make demo` and `make test`. Each creates .venv and installs into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/loom-ops: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/loom-ops

demo: $(BIN)/loom-ops
	$(BIN)/python -m agent.demo

test: $(BIN)/loom-ops
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q; code=$$?; if [ $$code -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$code

bench: $(BIN)/loom-ops
	$(BIN)/python bench/kernel.py
	$(BIN)/python bench/supervise.py
	$(BIN)/python bench/bot.py
	$(BIN)/python bench/http.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
