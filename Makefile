# Two commands do all set-up on a fresh machine (see README):
#   make demo   - every benchmark end to end on the offline stand-ins (CPU, no network)
#   make test   - the test suite
# Both create .venv if missing and install the project into it first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO_DIR ?= outputs/demo

.PHONY: demo test install clean-demo benchmark

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py requirements.txt
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	@echo 'demo: wired in as the benchmark issues land'

benchmark: $(STAMP)
	$(PY) benchmarks/explain_speed.py

clean-demo:
	rm -rf $(DEMO_DIR)
