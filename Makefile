# Set-up and the two entry points named in the README.
# `make sample`: install, then train, tag and evaluate on the bundled sample data.
# `make test`: install with the test extras, then run the test suite.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install sample test clean

# pyproject.toml pins torch==2.13.0, so pip takes the CPU wheel kept on this
# kind of machine instead of a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

sample: install
	$(BIN)/tagcli train sample_data/dataset.csv --no-refit
	$(BIN)/tagcli tag sample_data/batch.parquet -o out/batch.tagged.parquet --overwrite
	$(BIN)/tagcli eval --json out/eval.json --overwrite

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) models out
