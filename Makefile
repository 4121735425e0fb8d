# Two commands on a fresh machine: `make demo` and `make test`. Both are idempotent:
# the virtual environment is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all test-distributed test-browser install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/finetunekit demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

test-distributed: $(STAMP)
	$(BIN)/python -m pytest -m distributed tests/test_distributed.py tests/test_fsdp.py

# report.html in headless Chromium: needs a chromium binary (Debian: apt install chromium; or $CHROMIUM)
test-browser: $(STAMP)
	$(BIN)/python -m pytest -m browser tests/test_report.py

clean:
	rm -rf $(VENV) build *.egg-info
