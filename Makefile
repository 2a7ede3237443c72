# Two entry points for a fresh clone (Python >= 3.10 and the package index needed):
#   make demo   installs everything into .venv and runs the built-in end-to-end flow
#   make test   installs everything into .venv and runs the test suite (CPU only)
#   make test-fast   the fast tier for the edit loop (pytest -m "not slow": every module, a few minutes)
# Both run the test files in TEST_WORKERS=2 processes (pytest-xdist); TEST_WORKERS=1 runs them in one.
# Both are idempotent: the install step reruns only when pyproject.toml changes.
# DALI=cuda12 (default) installs NVIDIA DALI for CUDA 12+ drivers, DALI=cuda13 the CUDA 13 build; DALI=none
# installs none (a machine that already has DALI, e.g. a CUDA 13 box or wheels carried by hand).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out
DALI ?= cuda12
# Test files run in this many worker processes (pytest-xdist; a file's tests stay in one worker). 1: in this process.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
comma := ,
EXTRAS := test$(if $(filter none,$(DALI)),,$(comma)$(DALI))

.PHONY: install test test-fast demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@$(BIN)/python -m pytest -q $(PARALLEL); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

test-fast: $(STAMP)
	@$(BIN)/python -m pytest -q -m "not slow" $(PARALLEL)

demo: $(STAMP)
	$(BIN)/python -m fkd_dali demo --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-results .pytest_cache
