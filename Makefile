# One command each on a fresh machine: `make demo`, `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build here,
# while on a GPU box the same pin resolves to the CUDA wheel from PyPI. Repeating the pin in
# the second install stops a dependency from swapping torch for another build behind our back.
TORCH ?= torch==2.13.0
EXTRAS ?= dev,openvino,wandb

.PHONY: install demo test bench clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]" "$(TORCH)"
	touch $@

demo: install
	$(BIN)/llmctl demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_train.py

clean:
	rm -rf runs .pytest_cache
