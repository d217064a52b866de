# Ferryman's container image, and the demo backend image of the compose stack (target `demo`).
#
#   docker build -t ferryman .                       # the proxy (the last stage is the default target)
#   docker build -t ferryman-demo --target demo .    # python -m demo.backend, for docker-compose.yml
#
# Configuration is by FERRYMAN_* environment variables (every key of ferryman.example.toml, e.g.
# FERRYMAN_CONSUL_ADDR, FERRYMAN_CONSUL_TOKEN, FERRYMAN_CONSUL_DC), flags after the image name, or a file
# mounted into the container and named with --config. uvloop, httptools, orjson and cryptography install from
# wheels: no compiler in either stage.

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
