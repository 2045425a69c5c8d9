# `make demo` and `make test` bootstrap what they need into local virtual environments.
#   .venv         torch 2.13.0 (CPU) + megatron-core 0.16.1 (newest that installs on Python 3.11)
#   .venv-mcore19 the same with megatron-core 0.19.2 (what Python 3.12 clusters run), installed
#                 with --no-deps --ignore-requires-python; the megatron tests run in both so that
#                 API drift between the versions is caught.
PYTHON ?= python3
TORCH ?= torch==2.13.0
MCORE ?= megatron-core==0.16.1
MCORE_NEW ?= megatron-core==0.19.2
# megatron-core 0.19 imports triton unconditionally (CUDA builds of torch bring it along)
MCORE_NEW_DEPS ?= triton==3.9.0
VENV := .venv
VENV_NEW := .venv-mcore19
PYTEST_ARGS ?=

.PHONY: demo test test-mcore19 venv cuda-compile bench clean

$(VENV)/.installed: setup.py requirements.txt $(wildcard csrc/*.cpp csrc/cuda/*.cu)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -r requirements.txt $(MCORE)
	$(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# test-only packages (lm_eval, peft): `make test` needs them, `make demo` does not
$(VENV)/.test-installed: requirements-test.txt requirements-lmeval.txt $(VENV)/.installed
	$(VENV)/bin/pip install -q -r requirements-test.txt -r requirements-lmeval.txt
	touch $@

$(VENV_NEW)/.installed: setup.py requirements.txt requirements-test.txt
	test -x $(VENV_NEW)/bin/python || $(PYTHON) -m venv $(VENV_NEW)
	$(VENV_NEW)/bin/pip install -q $(TORCH)
	$(VENV_NEW)/bin/pip install -q -r requirements.txt
	$(VENV_NEW)/bin/pip install -q -r requirements-test.txt
	$(VENV_NEW)/bin/pip install -q $(MCORE_NEW_DEPS)
	$(VENV_NEW)/bin/pip install -q --no-deps --ignore-requires-python $(MCORE_NEW)
	LEP_MEGATRON_NO_EXT=1 $(VENV_NEW)/bin/pip install -q --no-build-isolation --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lep-megatron demo

test: $(VENV)/.test-installed $(VENV_NEW)/.installed
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)
	$(MAKE) test-mcore19

test-mcore19: $(VENV_NEW)/.installed
	$(VENV_NEW)/bin/python -m pytest -q -m "megatron and not primary_only" tests $(PYTEST_ARGS)

cuda-compile: $(VENV)/.installed
	bash csrc/compile_cuda.sh $(VENV)/bin/python

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/convert.py
	$(VENV)/bin/python benchmarks/tokenizer_train.py
	$(VENV)/bin/python benchmarks/init.py

clean:
	rm -rf $(VENV) $(VENV_NEW) build *.egg-info lep_megatron/_C*.so
