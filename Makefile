# One command each on a fresh machine: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0 is the CPU build that lies on this kind of machine's disk; any other spec pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test test-slow test-gpu demo lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(BIN)/pip install -q "$(TORCH)" -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

demo: install
	$(BIN)/python -m distill recipe=demo
	$(BIN)/python -m eval.readme_numbers runs/demo --warn

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs outputs .pytest_cache
