# civicdp: `make demo` sets up and starts the demo server (fresh budgets each time); `make test` sets up
# and runs the suite; `make clean` removes the venv, the demo's data and the demo's state.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install install-browser demo tour test test-fast bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Every `make demo` starts from a fresh demo state (fresh budgets, an empty audit log): --reset removes
# the state the last demo left in CIVICDP_DATA_DIR (default ./data), and refuses one the demo did not
# create. `.venv/bin/civicdp demo` (without --reset) continues the last demo's state instead.
demo: install
	$(BIN)/civicdp demo --reset --yes --data data/demo

tour: install
	$(BIN)/civicdp tour --data data/demo

# The browser tests (tests/browser, Playwright) drive Debian's chromium: installed here when absent
# (CI runs as root); quick when it is there already. Without root and without chromium the browser
# tests are skipped, each saying why (CIVICDP_REQUIRE_BROWSER=1 makes that a failure instead).
CHROMIUM ?= /usr/bin/chromium
install-browser:
	@if [ -x $(CHROMIUM) ]; then echo "chromium: $$($(CHROMIUM) --version 2>/dev/null || echo $(CHROMIUM))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "no $(CHROMIUM), and not root (or no apt-get) to install it: the browser tests will be skipped"; fi

test: install install-browser
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m bench.w1 --people 200000
	$(BIN)/python -m bench.w3 --people 200000

# The demo's state goes first, while the venv is there to check it is the demo's (a state the demo did
# not create is left in place, and said so); then the rest.
clean:
	-if [ -x $(BIN)/civicdp ]; then $(BIN)/civicdp demo --remove --yes; \
	elif [ -f $${CIVICDP_DATA_DIR:-data}/demo-state.json ]; then \
	  echo "no $(BIN): the demo's state in $${CIVICDP_DATA_DIR:-data}/ is left; run make install && make clean"; fi
	rm -rf $(VENV) data/demo bench/out .pytest_cache .hypothesis
