# qsmprep developer entry points.  `make demo` and `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Without an NVIDIA GPU, take PyTorch's CPU build (a few hundred MB instead of several GB)
# from PyTorch's index, when it can be reached (offline mirrors carry the CPU wheel
# themselves, and an unreachable index costs every package several retries).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
HAVE_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_INDEX_UP := $(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/', timeout=5)" >/dev/null 2>&1 && echo 1)
DEMO_DIR ?= demo
NPROCS ?= 2
# Pinned versions of every dependency (the Dockerfile and CI install from it too).
CONSTRAINTS ?= constraints.txt
PIP_INSTALL := $(PY) -m pip install --quiet -c $(CONSTRAINTS)

.PHONY: venv demo test test-all lint bench clean constraints

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(HAVE_GPU),1)
	$(PIP_INSTALL) "torch==$(TORCH_VERSION)"
else ifeq ($(TORCH_INDEX_UP),1)
	$(PIP_INSTALL) "torch==$(TORCH_VERSION)" --extra-index-url $(TORCH_CPU_INDEX)
else
	$(PIP_INSTALL) "torch==$(TORCH_VERSION)"
endif
	$(PIP_INSTALL) -e ".[sim,templates,test]"
	@touch $@

# Re-pin after a dependency change: install or upgrade it in .venv, then `make constraints`.
# torch is pinned without its local label (+cpu, +cu126), so that any build of it fits.
constraints: venv
	{ echo "# Pinned dependencies of qsmprep (all extras), from a working .venv by"; \
	  echo "# 'make constraints'; used by 'make venv', the Dockerfile and CI."; \
	  $(PY) -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

demo: venv
	$(VENV)/bin/qsmprep-demo --demo-dir $(DEMO_DIR) --nprocs $(NPROCS)

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

lint: venv
	$(VENV)/bin/ruff check qsmprep tests benchmarks
	$(VENV)/bin/ruff format --check qsmprep tests benchmarks

bench: venv
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
