# One command each (see README.md):
#   make demo   set up and run the main job on embedded defaults (no server: SQLite, in-process)
#   make test   set up and run the whole test suite against real Redis and PostgreSQL (and
#               headless Chromium for the report page: scripts/system-packages.sh, as root)
# The two real DR17 apStar files shipped in samples/ (see samples/README.md).
SPECTRA ?= samples/apstar
PYTEST_ARGS ?=

.PHONY: demo test setup setup-test bench

setup:
	bash scripts/bootstrap.sh

setup-test:
	bash scripts/bootstrap.sh test

demo: setup
	.venv/bin/astronn-dist run $(SPECTRA)

test: setup-test
	bash scripts/system-packages.sh
	bash scripts/services.sh
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench: setup-test
	bash scripts/services.sh
	.venv/bin/python -m bench
