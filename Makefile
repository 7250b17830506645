PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# make test-lowest: a second venv with every dependency at pyproject.toml's lower bound.
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
CONSTRAINTS := .ci/lowest-constraints.txt

.PHONY: test lint test-lowest run bench dist clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

# All three run, so one report has every finding; the target fails if any did.
lint: $(STAMP)
	@status=0; \
	set -x; \
	$(BIN)/python .ci/lowest.py || status=1; \
	$(BIN)/ruff check --output-format concise . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

# The dependencies, pinned (PIP_CONSTRAINT also reaches pip's isolated build, so setuptools too).
$(LOWEST_STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) .ci/lowest.py
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	PIP_CONSTRAINT=$(CONSTRAINTS) $(LOWEST)/bin/pip install -q '.[test]'
	touch $(LOWEST_STAMP)

# The project as a built wheel (not editable), reinstalled each time; then the whole suite.
test-lowest: $(LOWEST_STAMP)
	rm -rf build  # setuptools' in-tree build dir would carry deleted modules into the wheel
	PIP_CONSTRAINT=$(CONSTRAINTS) $(LOWEST)/bin/pip install -q --no-deps --force-reinstall .
	$(LOWEST)/bin/python .ci/lowest.py --installed
	$(LOWEST)/bin/pytest -q

run: $(STAMP)
	$(BIN)/vcc-pki-server --dev --home ./pki-data --host 127.0.0.1 --port 8443

# The sdist and the wheel in dist/ (docs/operations.md, Installing): one wheel for the SDK alone
# (`pip install vcc_pki-*.whl`) and the server (`pip install "vcc_pki-*.whl[server]"`).
dist: $(STAMP)
	rm -rf build dist
	$(BIN)/python -m build --outdir dist .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) $(LOWEST) .pytest_cache .mypy_cache build dist
