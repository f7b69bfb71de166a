# The two commands: `make run` serves the app, `make test` runs the whole suite.
# Both start from a fresh clone: they build .venv, install the project and make sure the
# system packages they need (memcached; wrk for `make bench`) are there.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNDIR := .run
MEMCACHED_ADDR ?= 127.0.0.1:11211

.PHONY: venv run test lint bench sysdeps-test sysdeps-bench memcached-up clean

# ---- shared set-up (idempotent: re-runs only when pyproject.toml changes) -------------
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	@touch $@

# ---- system packages: installed with apt-get when we are root, else explained ----------
define need_pkg
	@if ! command -v $(1) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo ">>> installing $(2) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "!!! $(1) is not installed. Install it with: sudo apt-get install $(2)"; exit 1; \
	  fi; \
	fi
endef

sysdeps-test:
	$(call need_pkg,memcached,memcached)

sysdeps-bench:
	$(call need_pkg,memcached,memcached)
	$(call need_pkg,wrk,wrk)

# ---- make run -------------------------------------------------------------------------
# Starts a local memcached on $(MEMCACHED_ADDR) when the binary exists and nothing listens
# there; without one, the service still runs on its in-process tier, and says so.
memcached-up: venv
	@if $(BIN)/python -m service.probe $(MEMCACHED_ADDR); then \
	  echo ">>> memcached answers on $(MEMCACHED_ADDR)"; \
	else \
	  if ! command -v memcached >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo ">>> installing memcached with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached >/dev/null || true; \
	  fi; \
	  if command -v memcached >/dev/null 2>&1; then \
	    mkdir -p $(RUNDIR); \
	    echo ">>> starting memcached on $(MEMCACHED_ADDR) (pid file $(RUNDIR)/memcached.pid)"; \
	    memcached -d -u "$$(id -un)" -l $(firstword $(subst :, ,$(MEMCACHED_ADDR))) \
	      -p $(lastword $(subst :, ,$(MEMCACHED_ADDR))) -U 0 -m 64 -c 4096 \
	      -P $(abspath $(RUNDIR))/memcached.pid; \
	    $(BIN)/python -m service.probe --wait 5 $(MEMCACHED_ADDR) || echo "!!! memcached did not come up"; \
	  else \
	    echo "!!!"; \
	    echo "!!! NO MEMCACHED on $(MEMCACHED_ADDR) and none installed."; \
	    echo "!!! Running on the IN-PROCESS TIER ONLY: workers do not share entries, leases"; \
	    echo "!!! and counters are per worker. Install it: sudo apt-get install memcached"; \
	    echo "!!!"; \
	  fi; \
	fi

run: venv memcached-up
	$(BIN)/gunicorn -c deploy/gunicorn.conf.py wsgi:app

# ---- make test ------------------------------------------------------------------------
test: $(VENV)/.installed-dev sysdeps-test
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory lint

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check service tests bench examples wsgi.py deploy
	$(BIN)/mypy --strict service

bench: $(VENV)/.installed-dev sysdeps-bench
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(RUNDIR) .pytest_cache .mypy_cache .ruff_cache
