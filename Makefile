# The two commands a new user needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONSUL := $(VENV)/bin/consul
SHARED_ENSURE_CONSUL := ../shared/bin/ensure-consul

.PHONY: demo test test-debs bench lint clean consul venv

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ferryman needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

venv: $(VENV)/.installed

# A real Consul agent binary: one on PATH, else the project's shared helper (Debian package, no root).
$(CONSUL):
	@mkdir -p $(VENV)/bin
	@if command -v consul >/dev/null 2>&1; then \
		cp "$$(command -v consul)" $(CONSUL); \
	elif [ -x $(SHARED_ENSURE_CONSUL) ]; then \
		$(SHARED_ENSURE_CONSUL) $(VENV)/bin >/dev/null; \
	else \
		echo "No Consul binary found. Install Consul (e.g. 'apt-get install consul' or HashiCorp's release) so that 'consul' is on PATH, then run make again." >&2; \
		exit 1; \
	fi
	@$(CONSUL) version | head -n 1

consul: $(CONSUL)

# Without a Consul binary the demo runs on Ferryman's static provider (it says so).
demo: $(VENV)/.installed
	-@$(MAKE) --no-print-directory consul
	$(PY) -m demo.run --consul-bin $(CONSUL)

# Install Debian packages that are missing (as root, or through sudo); used by `test` and `bench`.
define APT_ENSURE
	@missing=""; \
	for p in $(1); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "installing$$missing"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

# The observability tests run a real Prometheus (its binary, with the test's own config; never the system
# service) and a headless Chromium against the status page; tests/unit/test_compose.py validates the compose
# file with Debian's docker-compose (`docker-compose config` needs no Docker engine).
TEST_DEBS := prometheus chromium docker-compose

test-debs:
	$(call APT_ENSURE,$(TEST_DEBS))

test: $(VENV)/.installed $(CONSUL) test-debs
	CONSUL_BIN=$(abspath $(CONSUL)) $(PY) -m pytest -q

# The benchmark (issue 3): Ferryman beside nginx, HAProxy and Caddy, through a real Consul agent, on loopback.
# Debian's wrk, nginx-light, haproxy and caddy are installed when missing; bench/run.py runs its own
# instances of them (own configs, temp dirs, loopback ports; Caddy with its admin API off and HOME/XDG_* in
# the temp dir) and never uses or touches their system services.
BENCH_DEBS := wrk nginx-light haproxy caddy

bench: $(VENV)/.installed $(CONSUL)
	$(call APT_ENSURE,$(BENCH_DEBS))
	$(PY) bench/run.py $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check discovery proxy tests demo bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
