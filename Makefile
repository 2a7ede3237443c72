# Two entry points for a fresh clone (Python >= 3.10 and the package index needed):
#   make demo   installs everything into .venv and runs the built-in end-to-end flow
#   make test   installs everything into .venv and runs the test suite (CPU only)
#   make test-fast   the fast tier for the edit loop (pytest -m "not slow": every module, a few minutes)
# Both are idempotent: the install step reruns only when pyproject.toml changes.
# DALI=cuda12 (default) installs NVIDIA DALI for CUDA 12+ drivers, DALI=cuda13 the CUDA 13 build; DALI=none
# installs none (a machine that already has DALI, e.g. a CUDA 13 box or wheels carried by hand).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out
DALI ?= cuda12
comma := ,
EXTRAS := test$(if $(filter none,$(DALI)),,$(comma)$(DALI))

.PHONY: install test test-fast demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	@$(BIN)/python -m pytest -q -m "not slow"

demo: $(STAMP)
	$(BIN)/python -m fkd_dali demo --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-results .pytest_cache
