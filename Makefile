# The two commands a new user needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONSUL := $(VENV)/bin/consul
SHARED_ENSURE_CONSUL := ../shared/bin/ensure-consul

.PHONY: demo test bench lint clean consul venv

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

demo: $(VENV)/.installed $(CONSUL)
	$(PY) -m demo.run --consul-bin $(CONSUL)

test: $(VENV)/.installed $(CONSUL)
	CONSUL_BIN=$(abspath $(CONSUL)) $(PY) -m pytest -q

# The benchmark (issue 3): Ferryman beside nginx, HAProxy and Caddy, through a real Consul agent, on loopback.
# Debian's wrk, nginx-light, haproxy and caddy are installed when missing; bench/run.py runs its own
# instances of them (own configs, temp dirs, loopback ports; Caddy with its admin API off and HOME/XDG_* in
# the temp dir) and never uses or touches their system services.
BENCH_DEBS := wrk nginx-light haproxy caddy

bench: $(VENV)/.installed $(CONSUL)
	@missing=""; \
	for p in $(BENCH_DEBS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		echo "bench: installing$$missing"; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(PY) bench/run.py $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check discovery proxy tests demo bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
