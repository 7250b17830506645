PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint run bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q

# Both run, so one report has every finding; the target fails if any did.
lint: $(STAMP)
	@status=0; \
	set -x; \
	$(BIN)/ruff check --output-format concise . || status=1; \
	$(BIN)/mypy || status=1; \
	exit $$status

run: $(STAMP)
	$(BIN)/vcc-pki-server --dev --home ./pki-data --host 127.0.0.1 --port 8443

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build
