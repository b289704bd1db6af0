# The two commands: `make demo` (the whole story on an embedded MLflow) and `make test`.
# Both create .venv on first use: Python 3.11, torch/torchvision pinned in constraints.txt,
# the project installed editable with its test extras.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.xai-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-all lint bench venv clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,text]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m registry.demo $(DEMO_ARGS)

# The typed surface: core/ and the public xai_plugins API (what third-party plugins import).
TYPED := core xai_plugins/__init__.py xai_plugins/toolkit.py xai_plugins/similarity.py

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy --follow-imports=silent $(TYPED)
	XAI_NO_PROGRESS=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy --follow-imports=silent $(TYPED)

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .xai tests/.cache demo-workspace

# Everything, including the `slow` end-to-end tests (the 50-version registry burst: ~30 min on 2 cores).
test-all: $(STAMP)
	XAI_NO_PROGRESS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)
