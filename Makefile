# The two commands a new user needs: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CONSUL := $(VENV)/bin/consul
SHARED_ENSURE_CONSUL := ../shared/bin/ensure-consul

.PHONY: demo test compiled test-debs compose-debs compose-test bench bench-debs bench-scale lint clean consul venv

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ferryman needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

venv: $(VENV)/.installed compiled

# The compiled hot path (issue 18): mypyc (from the dev extra) compiles the modules listed in proxy/compiled.py
# into proxy/_mypyc when a C compiler and Python's headers are here (Debian: gcc, python3-dev); without them it
# says so and the pure-Python source runs. Nothing is redone while the build matches the source; an edited
# source runs as Python (`ferryman --version` says which) until this runs again. About 30 s on 2 cores.
compiled: $(VENV)/.installed
	$(PY) -m proxy.build

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
demo: $(VENV)/.installed compiled
	-@$(MAKE) --no-print-directory consul
	$(PY) -m demo.run --consul-bin $(CONSUL)

# Install Debian packages that are missing (as root, or through sudo). Only for packages that start or enable
# no system service (no systemd unit, no init script): chromium and docker-compose (installed without its
# recommended docker.io, which would start dockerd). tests/unit/test_makefile.py keeps it that way.
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

# Debian packages whose binaries we only need, unpacked under .venv/debs (never installed: `dpkg-deb -x` runs no
# maintainer script, so no service is started or enabled, and no root is needed) with a command in .venv/bin per
# binary. Arguments: a package, then the binaries to link. The package's library dependencies missing from
# the system are unpacked beside it and the command sets LD_LIBRARY_PATH for them. `apt-get download` needs
# package lists: the system's; else `apt-get update` (as root, or with sudo when it needs no password); else
# lists of our own under .venv/debs/lists (a user without sudo).
define UNPACK_DEB_SH
set -eu
venv=$(cd "$1" && pwd); pkg=$2; shift 2
debs=$venv/debs; root=$debs/root
mkdir -p "$debs" "$root" "$venv/bin"
opts=""
if [ "$(id -u)" = 0 ]; then opts="-o APT::Sandbox::User=root"; fi  # _apt may not write to .venv/debs
if [ -d "$debs/lists" ]; then
	opts="$opts -o Dir::State::Lists=$debs/lists -o Debug::NoLocking=1"
elif ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
	if [ "$(id -u)" = 0 ]; then apt-get update -qq
	elif sudo -n true 2>/dev/null; then sudo apt-get update -qq
	else
		mkdir -p "$debs/lists/partial"
		opts="$opts -o Dir::State::Lists=$debs/lists -o Debug::NoLocking=1"
		apt-get $opts update -qq
	fi
fi
fetch() {
	rm -f "$debs/$1"_*.deb
	(cd "$debs" && apt-get $opts download -qq "$1") >&2
	ls "$debs/$1"_*.deb
}
depends() {  # the first alternative of each dependency of .deb $1
	dpkg-deb -f "$1" Depends | tr ',' '\n' | sed 's/|.*//; s/(.*//; s/:any//; s/ //g'
}
unpack() {  # package $1 and its library dependencies the system lacks; prints the package's .deb
	deb=$(fetch "$1")
	dpkg-deb -x "$deb" "$root"
	for dep in $(depends "$deb" | grep '^lib' || true); do
		dpkg-query -W -f='${Status}' "$dep" 2>/dev/null | grep -q 'install ok installed' && continue
		dpkg-deb -x "$(fetch "$dep")" "$root"
	done
	echo "$deb"
}
found() {
	for bin in "$@"; do
		[ -x "$root/usr/bin/$bin" ] || [ -x "$root/usr/sbin/$bin" ] || return 1
	done
}
deb=$(unpack "$pkg")
# Some packages only depend on the one with the binary (bookworm's nginx-light on nginx): unpack those too.
if ! found "$@"; then
	for dep in $(depends "$deb" | grep -v '^lib' || true); do unpack "$dep" >/dev/null; done
fi
libs=$(ls -d "$root"/usr/lib/*-linux-gnu "$root"/lib/*-linux-gnu 2>/dev/null | paste -s -d: -)
for bin in "$@"; do
	path=""
	for dir in usr/bin usr/sbin; do
		if [ -x "$root/$dir/$bin" ]; then path=$root/$dir/$bin; break; fi
	done
	if [ -z "$path" ]; then echo "$pkg has no binary $bin" >&2; exit 1; fi
	rm -f "$venv/bin/$bin"
	if [ -z "$libs" ]; then ln -s "$path" "$venv/bin/$bin"; continue; fi
	printf '#!/bin/sh\n# %s from Debian package %s, unpacked by make (not installed)\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
		"$bin" "$pkg" "$libs" "$path" > "$venv/bin/$bin"
	chmod 0755 "$venv/bin/$bin"
done
endef
export UNPACK_DEB_SH := $(value UNPACK_DEB_SH)
UNPACK_DEB = sh -c "$$UNPACK_DEB_SH" unpack-deb $(VENV)

# The observability tests run a real Prometheus (its binary, with the test's own config) and promtool, from
# Debian's prometheus package unpacked into .venv: installed, the package would start and enable a system
# Prometheus on :9090. A headless Chromium renders the status page; tests/unit/test_compose.py validates the
# compose file with Debian's docker-compose (`docker-compose config` needs no Docker engine). Neither ships a
# service, and Chromium's library tree is too large to unpack: those two are installed through apt.
TEST_APT_DEBS := chromium docker-compose

# One rule writes both commands.
$(VENV)/bin/promtool: | $(VENV)/.installed
	$(UNPACK_DEB) prometheus prometheus promtool
	$(VENV)/bin/prometheus --version >/dev/null && $(VENV)/bin/promtool --version >/dev/null

# nghttp and h2load (HTTP/2 clients for tests/integration/test_http2.py and bench/http2.py), from Debian's
# nghttp2-client, unpacked the same way (it ships no service, but unpacking needs no root).
$(VENV)/bin/nghttp: | $(VENV)/.installed
	$(UNPACK_DEB) nghttp2-client nghttp h2load

# Debian's redis-server (with redis-cli and redis-benchmark from redis-tools) for the TCP route tests and
# bench/tcp.py, unpacked like prometheus: installed, the package would start a system Redis on :6379.
$(VENV)/bin/redis-server: | $(VENV)/.installed
	$(UNPACK_DEB) redis-server redis-server redis-cli redis-benchmark

# HAProxy (unpacked for the benchmark below) is also the L4 balancer sending PROXY headers in the PROXY protocol tests.
test-debs: $(VENV)/bin/promtool $(VENV)/bin/nghttp $(VENV)/bin/redis-server $(VENV)/bin/haproxy
	$(call APT_ENSURE,$(TEST_APT_DEBS))

BUILD_KIND = $(PY) -c 'import proxy; print("compiled" if proxy.BUILD.compiled else "pure")'

# The whole suite runs on the compiled build when there is one (FERRYMAN_BUILD=compiled: a test of it cannot
# pass on the source by accident), then the unit suite once more on the pure-Python source, the fallback.
test: $(VENV)/.installed $(CONSUL) test-debs compiled
	FERRYMAN_BUILD=$$($(BUILD_KIND)) CONSUL_BIN=$(abspath $(CONSUL)) $(PY) -m pytest -q --ignore=tests/compose
	@if [ "$$($(BUILD_KIND))" = compiled ]; then echo "make test: the unit suite again, on the pure-Python build"; \
		FERRYMAN_BUILD=pure CONSUL_BIN=$(abspath $(CONSUL)) $(PY) -m pytest -q tests/unit; fi
	$(MAKE) --no-print-directory compose-test

# The compose stack for real (issue 20): tests/compose starts a Docker engine of its own (Debian's dockerd with
# containerd, runc, tini and iptables, unpacked into .venv/debs like prometheus: installed, docker.io would start
# and enable the system's docker service), builds stand-ins for the public images from Debian packages with
# debootstrap (also unpacked; it runs from .venv/debs with DEBOOTSTRAP_DIR), then Ferryman's images from the
# Dockerfile, and runs docker-compose.yml with Debian's docker-compose. The engine's state (images, the stand-ins,
# debootstrap's .debs) lives under /var/tmp/ferryman-docker, so a second run reuses it. Root is needed (dockerd).
COMPOSE_BINS := $(VENV)/bin/dockerd $(VENV)/bin/debootstrap

$(VENV)/bin/dockerd: | $(VENV)/.installed
	$(UNPACK_DEB) docker.io dockerd docker-proxy containerd containerd-shim-runc-v2 runc docker-init xtables-nft-multi
$(VENV)/bin/debootstrap: | $(VENV)/.installed
	$(UNPACK_DEB) debootstrap debootstrap

compose-debs: $(COMPOSE_BINS)

compose-test: $(VENV)/.installed $(CONSUL) test-debs compose-debs
	CONSUL_BIN=$(abspath $(CONSUL)) $(PY) -m pytest -q tests/compose $(PYTEST_ARGS)

# The benchmark (issue 3): Ferryman beside nginx, HAProxy and Caddy, through a real Consul agent, on loopback.
# Debian's wrk, nginx-light, haproxy and caddy are unpacked into .venv like prometheus (installed, nginx,
# haproxy and caddy would start system services on :80 and more); bench/run.py takes them from .venv/bin and
# runs its own instances of them (own configs, temp dirs, loopback ports; Caddy with its admin API off and
# HOME/XDG_* in the temp dir).
BENCH_BINS := $(VENV)/bin/wrk $(VENV)/bin/nginx $(VENV)/bin/haproxy $(VENV)/bin/caddy

$(VENV)/bin/wrk: | $(VENV)/.installed
	$(UNPACK_DEB) wrk wrk
$(VENV)/bin/nginx: | $(VENV)/.installed
	$(UNPACK_DEB) nginx-light nginx
$(VENV)/bin/haproxy: | $(VENV)/.installed
	$(UNPACK_DEB) haproxy haproxy
$(VENV)/bin/caddy: | $(VENV)/.installed
	$(UNPACK_DEB) caddy caddy

bench-debs: $(BENCH_BINS)

bench: $(VENV)/.installed $(CONSUL) bench-debs compiled
	$(PY) bench/run.py $(BENCH_ARGS)

# Discovery at cluster scale (issue 14): a Consul dev agent on its default limits, N services x M instances,
# Ferryman with W workers; only the agent and this project's venv are needed. Presets: quick (default), small,
# full (10,000 x 3, 16 workers). E.g. `make bench-scale BENCH_ARGS="--preset small"`.
bench-scale: $(VENV)/.installed $(CONSUL)
	CONSUL_BIN=$(abspath $(CONSUL)) $(PY) bench/scale.py $(BENCH_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check discovery proxy tests demo bench
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache proxy/_mypyc build/mypyc
