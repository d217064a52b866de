# Ferryman's container image, and the demo backend image of the compose stack (target `demo`).
#
#   docker build -t ferryman .                       # the proxy (the last stage is the default target)
#   docker build -t ferryman-demo --target demo .    # python -m demo.backend, for docker-compose.yml
#
# Configuration is by FERRYMAN_* environment variables (every key of ferryman.example.toml, e.g.
# FERRYMAN_CONSUL_ADDR, FERRYMAN_CONSUL_TOKEN, FERRYMAN_CONSUL_DC), flags after the image name, or a file
# mounted into the container and named with --config. uvloop, httptools, orjson and cryptography install from
# wheels; the build stage compiles Ferryman's own hot path with mypyc and gcc, and the runtime stage has no
# compiler (`docker run ferryman --version` says "compiled: mypyc, N modules").

ARG PYTHON_IMAGE=python:3.12-slim

# Build stage: Ferryman and its dependencies into a virtual environment (a non-editable install, so the
# status page proxy/static/status.html is in it as package data).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/ferryman
WORKDIR /src
COPY pyproject.toml README.md ./
COPY discovery ./discovery
COPY proxy ./proxy
RUN /opt/ferryman/bin/pip install --no-cache-dir . \
 && /opt/ferryman/bin/python -c "import importlib.resources as r; assert r.files('proxy').joinpath('static/status.html').is_file()" \
 && cd / && /opt/ferryman/bin/python -c "import proxy.app, proxy.workers, proxy.cli"
# The compiled hot path (proxy/build.py, `make compiled`): a C compiler and Python's headers from Debian
# (python3-dev only where the base's Python has no headers of its own, as Debian's python3 has not), mypyc from
# the package index into a directory of its own. The compiled modules are copied into the installed package;
# the tools stay in this stage. The image refuses to build without the compiled hot path (--require).
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
 && if [ ! -f "$(/opt/ferryman/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then \
        apt-get install -y -qq --no-install-recommends python3-dev; fi \
 && rm -rf /var/lib/apt/lists/* \
 && /opt/ferryman/bin/pip install --no-cache-dir --quiet --target /opt/mypyc mypy setuptools \
 && PYTHONPATH=/opt/mypyc /opt/ferryman/bin/python -m proxy.build --require \
 && cp -r proxy/_mypyc "$(cd / && /opt/ferryman/bin/python -c 'import pathlib, proxy; print(pathlib.Path(proxy.__file__).parent)')/" \
 && cd / && /opt/ferryman/bin/ferryman --version | grep -F "(compiled: mypyc"

# Runtime base: the virtual environment only (no sources, no pip cache), run as an unprivileged user.
FROM ${PYTHON_IMAGE} AS runtime
COPY --from=build /opt/ferryman /opt/ferryman
RUN groupadd --system --gid 10001 ferryman \
 && useradd --system --uid 10001 --gid ferryman --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin ferryman
ENV PATH=/opt/ferryman/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001

# The demo backends of docker-compose.yml: the same demo/backend.py that `make demo` runs.
FROM runtime AS demo
WORKDIR /app
COPY demo ./demo
ENTRYPOINT ["python", "-m", "demo.backend"]
CMD ["--help"]

# Ferryman (the default target). The admin listener serves /ready, /healthz, /metrics and the status page;
# it listens on every interface here so that the healthcheck and Prometheus reach it: publish it only where
# it belongs (not on a public network).
FROM runtime AS ferryman
ENV FERRYMAN_LISTEN=0.0.0.0:8080 \
    FERRYMAN_ADMIN_LISTEN=0.0.0.0:9919 \
    FERRYMAN_CONSUL_ADDR=consul:8500
EXPOSE 8080 9919
# /ready: 200 once a routing table came from Consul; 503 while draining or when Consul has been silent for
# max_sync_age. Asks the port of FERRYMAN_ADMIN_LISTEN on loopback.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('FERRYMAN_ADMIN_LISTEN', ':9919').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/ready', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["ferryman"]
