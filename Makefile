# The two quick-start commands: `make serve` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# The studio's browser tests drive Debian's Chromium (Playwright never downloads a browser here).
CHROMIUM := /usr/bin/chromium
# The database tests start their own PostgreSQL cluster from Debian's server binaries (tests/postgres.py).
POSTGRES := /usr/bin/pg_ctlcluster
# The API tests that run a second time against a real PostgreSQL (the first pass uses SQLite).
PG_TESTS := tests/test_api.py tests/test_registry.py tests/test_migrations.py tests/test_tenancy.py \
	tests/test_quotas.py tests/test_audit_chain.py tests/test_jobs.py tests/test_job_retries.py \
	tests/test_lifecycle.py tests/test_artifacts.py tests/test_privacy_at_rest.py tests/test_moderation_policy.py tests/test_remembered.py
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The studio's Music tab engraves with abcjs, served by Atelier itself (no CDN at run time): one file
# from npm's tarball, checked against its sha256, kept out of git (atelier/studio/vendor/ is ignored).
ABCJS_VERSION := 6.7.2
ABCJS_SHA256 := 3290ef44c918d5e882029d3a47ad3dd63c16c8819da5abe921f3d1e642b4f4f0
ABCJS := atelier/studio/vendor/abcjs/abcjs-basic-min.js
# The native decoding kernels (atelier/common/native/kernels.cpp), compiled for this machine with g++.
NATIVE := atelier/common/native/build/.built

.PHONY: serve test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

$(POSTGRES):
	$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql

# npm pack fetches the tarball without installing anything; the .js is copied last, so a failed
# check leaves no target behind.
$(ABCJS):
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	(cd "$$tmp" && npm pack --silent abcjs@$(ABCJS_VERSION) >/dev/null) && \
	tar -xzf "$$tmp/abcjs-$(ABCJS_VERSION).tgz" -C "$$tmp" package/LICENSE.md package/dist/abcjs-basic-min.js.LICENSE \
	    package/dist/abcjs-basic-min.js && \
	echo "$(ABCJS_SHA256)  $$tmp/package/dist/abcjs-basic-min.js" | sha256sum --check --quiet && \
	mkdir -p $(@D) && cp "$$tmp/package/LICENSE.md" "$$tmp/package/dist/abcjs-basic-min.js.LICENSE" $(@D)/ && \
	cp "$$tmp/package/dist/abcjs-basic-min.js" $@

# A failed build prints why and leaves the Python paths in charge (the stamp still records the attempt).
$(NATIVE): atelier/common/native/kernels.cpp atelier/common/native/mkl_vendor.c $(STAMP)
	$(BIN)/python -m atelier.common.native
	touch $@

serve: $(STAMP) $(ABCJS) $(NATIVE)
	$(BIN)/atelier serve

test: $(DEV_STAMP) $(CHROMIUM) $(POSTGRES) $(ABCJS) $(NATIVE)
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q --db postgresql $(PG_TESTS)

bench: $(DEV_STAMP) $(NATIVE)
	$(BIN)/python benchmarks/text_decode.py

clean:
	rm -rf $(VENV) .pytest_cache atelier/common/native/build
