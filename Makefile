# The two commands: `make run` serves the app, `make test` runs the whole suite.
# Both start from a fresh clone: they build .venv, install the project and make sure the
# system packages they need (memcached; wrk for `make bench`) are there.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUNDIR ?= .run
MEMCACHED_ADDR ?= 127.0.0.1:11211

.PHONY: venv run test fleet lint bench sysdeps-test sysdeps-bench memcached-up stop clean

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

$(VENV)/.installed-bench: $(VENV)/.installed-dev
	$(BIN)/python -m pip install --quiet -e '.[test,lint,bench]'
	@touch $@

# ---- system packages: installed with apt-get when we are root, else explained ----------
define need_pkg
	@if ! PATH="$$PATH:/usr/sbin:/sbin" command -v $(1) >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo ">>> installing $(2) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "!!! $(1) is not installed. Install it with: sudo apt-get install $(2)"; exit 1; \
	  fi; \
	fi
endef

# chromium: the admin page's tests drive Debian's headless chromium (tests/browser.py).
# nutcracker is Debian's twemproxy: the tests run the fleet through it too (deploy/twemproxy.yml).
# Debian installs it in /usr/sbin, which a non-root PATH may lack: need_pkg looks there too.
# curl: the docs' console sessions are replayed with it (tests/integration/test_docs.py).
# nginx: the third tier (deploy/nginx.conf) and the front of the fleet in network
# namespaces; faketime puts one host's clock 30 s off.
sysdeps-test:
	$(call need_pkg,memcached,memcached)
	$(call need_pkg,chromium,chromium)
	$(call need_pkg,nutcracker,nutcracker)
	$(call need_pkg,curl,curl)
	$(call need_pkg,nginx,nginx)
	$(call need_pkg,faketime,faketime)

sysdeps-bench:
	$(call need_pkg,memcached,memcached)
	$(call need_pkg,wrk,wrk)
	$(call need_pkg,nginx,nginx)

# ---- make run / make stop ----------------------------------------------------------------
# deploy/run-local.sh does the process work (see its header). `make run` starts a local
# memcached on $(MEMCACHED_ADDR) when the binary exists and nothing listens there (it says
# so when it uses one it did not start), then gunicorn in the foreground; Ctrl-C stops
# gunicorn and the memcached it started. `make stop` (from another terminal) stops what
# `make run` started, found through the pid files in $(RUNDIR), and nothing else.
RUN_LOCAL = MEMCACHED_ADDR='$(MEMCACHED_ADDR)' RUNDIR='$(RUNDIR)' BIN='$(BIN)' \
	bash deploy/run-local.sh

memcached-up: venv
	@$(RUN_LOCAL) up

run: venv
	@$(RUN_LOCAL) run

stop:
	@$(RUN_LOCAL) stop

# ---- make test ------------------------------------------------------------------------
test: $(VENV)/.installed-dev sysdeps-test
	$(BIN)/python -m pytest
	$(MAKE) --no-print-directory lint

# The fleet in network namespaces alone (also part of `make test`): three app hosts and three
# memcached nodes each with an address of its own, nginx in front, every fault under load
# (tests/servers/netns.py). Needs root (`ip netns`, veth, a bridge); prints its figures.
fleet: $(VENV)/.installed-dev sysdeps-test
	$(BIN)/python -m pytest -s -p no:cacheprovider tests/integration/test_netns_fleet.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check service tests bench examples wsgi.py deploy
	$(BIN)/mypy --strict service tests/memstore.py

# The hit table against stock gunicorn, 1,000 connections, a cold key, RSS and a profile
# (writes docs/BENCHMARKS.md and the README's table between its bench:table markers), then
# the herd, the drop-in, recovery and the load protocol's figures (bench/protocol.py).
# BENCH_ARGS=--quick for a short smoke run (writes no document).
bench: $(VENV)/.installed-bench sysdeps-bench
	$(BIN)/python -m bench.throughput $(BENCH_ARGS)
	$(BIN)/python -m bench --workers 2
	$(BIN)/python -m bench.dropin
	$(BIN)/python -m bench.recovery
	$(BIN)/python -m bench.protocol
	$(BIN)/python -m bench.nginx

# Stops what `make run` started first: deleting its pid files would orphan the processes.
clean: stop
	rm -rf $(VENV) $(RUNDIR) .pytest_cache .mypy_cache .ruff_cache
