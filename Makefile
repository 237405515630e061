# Two commands do everything on a fresh machine:
#   make demo   set up .venv, generate line images, run the loop, print a summary and write a report
#   make test   set up .venv and run the default test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.PHONY: setup demo test test-slow test-hardening bench clean

setup: $(STAMP)

# constraints.txt: the known-good versions the suite passed with (see the file's header to refresh it).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[train,flows,dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/defect demo --workdir demo

test: setup
	$(BIN)/python -m pytest

test-slow: setup
	$(BIN)/python -m pytest -m slow

test-hardening: setup
	$(BIN)/python -m pytest -m hardening

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf demo .pytest_cache
