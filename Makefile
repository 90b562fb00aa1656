# credit-ledger developer commands. `make run` and `make test` are the two that matter;
# everything installs itself into .venv/ and node_modules/ on first use.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf

PROTO_FILES := $(shell find protos -name '*.proto' | LC_ALL=C sort)
CLIENT_SRC := clients/python/src
TYPECHECK_PATHS := ledger_server workers $(CLIENT_SRC)/ledger_client bench

# Runs a command with DATABASE_URL set: the caller's, or the embedded server under .data/
# (started if needed and left running; `make stop` stops it).
WITH_DB = dbenv="$$($(PY) -m ledger_server.devstack env --no-redis)" && eval "$$dbenv" &&

.PHONY: help venv lock node_modules proto proto-check buf-lint buf-breaking lint format typecheck \
	test soak run demo-data audit migrate stop clean distclean

help:
	@echo "make run          start PostgreSQL/Redis (embedded unless DATABASE_URL/REDIS_URL), migrate, serve"
	@echo "make test         lint + typecheck + pytest"
	@echo "make lint         ruff check, ruff format --check, buf lint, buf breaking, proto-check"
	@echo "make format       ruff format + ruff check --fix"
	@echo "make typecheck    mypy --strict"
	@echo "make soak         the model-based test with 2,000 examples (LEDGER_SOAK_EXAMPLES)"
	@echo "make lock         re-pin constraints.txt to the newest versions the pyprojects allow"
	@echo "make proto        regenerate $(CLIENT_SRC)/ledger from protos/"
	@echo "make buf-breaking buf breaking against every committed version of protos/"
	@echo "make demo-data    load the example rate card and catalogue into the running server"
	@echo "make migrate      apply migrations (DATABASE_URL or embedded)"
	@echo "make audit        check the ledger invariants over the whole database"
	@echo "make bench        benchmark the stack against its database and transport limits"
	@echo "make stop         stop the embedded servers left running under .data/"
	@echo "make clean        stop embedded servers; remove .data/ and caches"
	@echo "make distclean    clean + remove .venv/ and node_modules/"

# --- environments ---------------------------------------------------------------------------

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstalls only when a pyproject or constraints.txt changes; delete the stamp to force it.
# constraints.txt pins every package to the versions the suite last passed with, so a new
# release upstream (rq 3 changed the worker's method signatures) cannot break a fresh install.
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ./clients/python -e '.[dev,embedded]'
	touch $@

# Resolves the newest versions the pyprojects allow in a scratch virtualenv and writes them to
# constraints.txt; run `make test` on the result before committing it.
lock:
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(PYTHON) -m venv "$$tmp/venv" && \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip && \
	"$$tmp/venv/bin/python" -m pip install -q -e ./clients/python -e '.[dev,embedded]' && \
	{ sed -n '1,2p' constraints.txt; \
	  "$$tmp/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v '^#\|^pip=='; \
	} > "$$tmp/c.txt" && \
	mv "$$tmp/c.txt" constraints.txt && echo "constraints.txt updated; now run make test"

node_modules: $(NODE_STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

# --- protos ---------------------------------------------------------------------------------

# $(call gen_proto,OUTDIR): generate the ledger package (messages, stubs, .pyi) into OUTDIR.
define gen_proto
rm -rf $(1) && mkdir -p $(1) && \
	$(PY) -m grpc_tools.protoc -Iprotos \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
		--python_out=$(1) --grpc_python_out=$(1) --mypy_out=$(1) --mypy_grpc_out=$(1) \
		$(PROTO_FILES) && \
	find $(1)/ledger -type d -exec touch {}/__init__.py \; && \
	touch $(1)/ledger/py.typed
endef

proto: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(call gen_proto,$$tmp/out) && \
	rm -rf $(CLIENT_SRC)/ledger && cp -R "$$tmp/out/ledger" $(CLIENT_SRC)/ledger
	@echo "regenerated $(CLIENT_SRC)/ledger"

proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	$(call gen_proto,$$tmp/out) && \
	if ! diff -r -x __pycache__ "$$tmp/out/ledger" $(CLIENT_SRC)/ledger; then \
		echo "error: $(CLIENT_SRC)/ledger is out of date with protos/; run 'make proto' and commit the result" >&2; \
		exit 1; \
	fi
	@echo "proto-check: generated code is up to date"

buf-lint: $(NODE_STAMP)
	$(BUF) lint

# The contract only grows: the protos must not break any earlier version committed to this
# repository (every commit that touched protos/), so a field removed or renumbered since any
# of them fails, however many commits ago it was published. Needs history (a full clone).
buf-breaking: $(NODE_STAMP)
	@revs=$$(git log --format=%H -- protos 2>/dev/null || true); \
	for rev in $$revs; do \
		$(BUF) breaking --against ".git#ref=$$rev" || { echo "buf-breaking: breaks $$rev" >&2; exit 1; }; \
	done; \
	echo "buf-breaking: compatible with $$(echo $$revs | wc -w) earlier version(s) of protos/"

# --- checks ---------------------------------------------------------------------------------

lint: $(STAMP) $(NODE_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(MAKE) --no-print-directory buf-lint
	$(MAKE) --no-print-directory buf-breaking
	$(MAKE) --no-print-directory proto-check

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

typecheck: $(STAMP)
	$(PY) -m mypy $(TYPECHECK_PATHS)

# pytest's exit status is passed through as is (5 = no tests collected fails the build).
# The suite runs on two processes (pytest-xdist; a file's tests stay on one): alone it kept a
# 2-core machine half idle, waiting on servers, PostgreSQL and subprocesses. Each process has
# its own database and embedded Redis, or its own database numbers of REDIS_URL's server
# (tests/support/rq_workers.py). PYTEST_WORKERS=0: one process.
# Files go to the processes in their own (alphabetical) order, not largest first: each process's
# clock only moves forward (tests jump it ahead), and a test reading periods of real time
# (Stripe's, the workers') through the server must not come after files that moved it months.
PYTEST_WORKERS ?= 2
test: lint typecheck
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The model-based test (tests/test_model_based.py) with 2,000 examples of 50 steps, explored
# at random rather than derandomized as in `make test` (100 examples there).
soak: $(STAMP)
	LEDGER_SOAK_EXAMPLES=$${LEDGER_SOAK_EXAMPLES:-2000} $(PY) -m pytest tests/test_model_based.py -k step_by_step -s

# --- running --------------------------------------------------------------------------------

run: $(STAMP)
	$(PY) -m ledger_server.devstack run

# Loads the example rate card and catalogue (ledger_server/demo/catalogue.json) into the running `make run`.
demo-data: $(STAMP)
	$(PY) -m ledger_server.demo

# Starts its own stack (embedded servers under .data/bench unless DATABASE_URL/REDIS_URL);
# BENCH_QUICK=1 for a smoke check, BENCH_SECONDS etc. in bench/run.py. Writes
# bench/results.json and BENCHMARKS.md.
.PHONY: bench
bench: $(STAMP)
	@$(PY) -m pip show -q py-spy >/dev/null 2>&1 || $(PY) -m pip install -q py-spy || true
	$(PY) -m bench

migrate: $(STAMP)
	$(WITH_DB) $(PY) -m ledger_server migrate

audit: $(STAMP)
	$(WITH_DB) $(PY) -m ledger_server audit

stop:
	@if [ -x $(PY) ]; then $(PY) -m ledger_server.devstack stop; fi

clean: stop
	rm -rf .data build dist .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -path ./node_modules -prune -o \
		\( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) node_modules
