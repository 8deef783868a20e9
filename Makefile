# dicomnode: `make run` installs and starts the node; `make test` installs what the tests need and runs them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CONFIG ?= config.toml

.PHONY: install run test test-deps benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on these machines (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: install
	$(VENV)/bin/dicomnode serve --config $(CONFIG)

# Real peers used by the tests: dcmtk (storescu/storescp/echoscu), Orthanc, and PostgreSQL (the tests start
# their own server in a temporary folder: tests/pgserver.py)
test-deps:
	@command -v storescu >/dev/null && command -v Orthanc >/dev/null && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends dcmtk orthanc postgresql)

test: install test-deps
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q -ra

benchmarks: install test-deps
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/inference.py

clean:
	rm -rf $(VENV) var .pytest_cache
