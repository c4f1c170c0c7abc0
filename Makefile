# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything from requirements.lock.txt (--no-deps: torch 2.13.0 CPU, torchrec + fbgemm-gpu-cpu as
# ENV.md requires); a second run reinstalls nothing (the stamp depends on the lock and pyproject).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ebr-installed
WORKSPACE ?= ./workspace

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock.txt pyproject.toml | $(PY)
	$(PY) -m pip install --no-deps -r requirements.lock.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/ebr demo --workspace $(WORKSPACE)

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(WORKSPACE) .pytest_cache
