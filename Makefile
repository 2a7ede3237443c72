# Two entry points for a fresh clone (Python >= 3.10 and the package index needed):
#   make demo   installs everything into .venv and runs the built-in end-to-end flow
#   make test   installs everything into .venv and runs the test suite (CPU only)
# Both are idempotent: the install step reruns only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo-out

.PHONY: install test demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	@$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

demo: $(STAMP)
	$(BIN)/python -m fkd_dali demo --workdir $(DEMO_DIR)

clean:
	rm -rf $(VENV) $(DEMO_DIR) bench-results .pytest_cache
