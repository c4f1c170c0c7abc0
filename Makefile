# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything from requirements.lock.txt (generated from pyproject.toml by `make lock`) and
# requirements-torchrec.lock.txt (torchrec + fbgemm-gpu-cpu, as ENV.md requires), all with --no-deps;
# a second run reinstalls nothing (the stamp depends on the locks and pyproject).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ebr-installed
WORKSPACE ?= ./workspace

.PHONY: install demo test lint bench lock clean browser screenshot

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock.txt requirements-torchrec.lock.txt pyproject.toml | $(PY)
	$(PY) -m pip install --no-deps -r requirements.lock.txt -r requirements-torchrec.lock.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/ebr demo --workspace $(WORKSPACE)

test: install lint browser
	$(PY) -m pytest -q

# the explorer's browser tests drive Debian's Chromium through /usr/bin/chromedriver (nothing is
# downloaded at test time); as root this installs both, otherwise it says what to install
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "browser tests need Chromium: apt-get install chromium chromium-driver (as root)"; \
	  fi; \
	fi

# docs/explore.png: the explorer page on the demo's world (run `make demo` first)
screenshot: install browser
	$(PY) tools/screenshot.py --workspace $(WORKSPACE) --out docs/explore.png

lint: install
	$(VENV)/bin/ruff check src tests benchmarks tools

# the speed and quality measurements of benchmarks/ (long: see each script's docstring)
bench: install
	for b in synth corpus train_throughput serve quality crossing; do $(PY) benchmarks/$$b.py || exit 1; done

# regenerate requirements.lock.txt from pyproject.toml with pip's resolver
lock: install
	$(PY) tools/lock.py

clean:
	rm -rf $(VENV) $(WORKSPACE) .pytest_cache
