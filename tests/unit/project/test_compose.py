"""The container files, checked without a Docker engine: docker-compose.yml, compose/, Dockerfile, .dockerignore.

`docker-compose config` (Debian's docker-compose package, installed by `make test`) validates the compose file
and prints it normalized (relative paths made absolute, anchors merged); the checks below read that output. The
Dockerfile is parsed here instruction by instruction. Building the images and running the stack need an engine:
tests/compose does that (`make compose-test`).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.config import DEFAULTS, HostPort, load

REPO = Path(__file__).resolve().parents[3]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DEMO_SERVICES = ("web-1", "web-2", "api-1")
ROOT_USERS = {"root", "0"}


# --- docker-compose -------------------------------------------------------------------------------------------

def _docker_compose(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not on PATH: `make test` installs Debian's docker-compose package "
                    "(or run `make test-debs`); `docker-compose config` validates the file without a Docker engine")
    return subprocess.run([exe, "-f", str(COMPOSE_FILE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as `docker-compose config` normalizes it."""
    result = _docker_compose("config")
    assert result.returncode == 0, result.stderr
    normalized: dict[str, Any] = yaml.safe_load(result.stdout)
    return normalized


def _service(compose: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in compose["services"], f"no service {name!r} in docker-compose.yml"
    return compose["services"][name]  # type: ignore[no-any-return]


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """{container path: host path} of a service's bind mounts."""
    out = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume["source"], volume["target"]
        else:
            source, target = volume.split(":")[:2]
        out[target] = Path(source)
    return out


def _published(service: dict[str, Any]) -> dict[int, int]:
    """{container port: host port}."""
    out = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out[int(port["target"])] = int(port["published"])
        else:
            *host, container = port.split("/")[0].split(":")
            out[int(container)] = int(host[-1])
    return out


def _command(value: Any) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value or []]


def _healthcheck_code(test: list[str]) -> str:
    """The Python code of a `python -c CODE` healthcheck."""
    assert test[:3] in (["CMD", "python", "-c"], ["CMD", "python3", "-c"]), test
    return test[3]


def test_compose_file_validates() -> None:
    result = _docker_compose("config", "-q")
    assert result.returncode == 0, f"docker-compose config -q failed:\n{result.stderr}"


def test_the_stack_has_its_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"consul", "ferryman", "prometheus", "grafana", *DEMO_SERVICES}


def test_images_are_pinned_and_built_ones_name_a_dockerfile_stage(compose: dict[str, Any]) -> None:
    stages = Dockerfile.read().stage_names
    for name, service in compose["services"].items():
        if "build" in service:
            assert Path(service["build"]["context"]) == REPO, name
            assert service["build"].get("target") in stages, f"{name}: build target is not a Dockerfile stage"
            continue
        image = service["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag not in ("", "latest"), f"{name}: pin the image's tag ({image})"
    assert _service(compose, "consul")["image"].startswith("hashicorp/consul:")


def test_ferryman_service(compose: dict[str, Any]) -> None:
    ferryman = _service(compose, "ferryman")
    env = ferryman["environment"]
    assert ferryman["build"]["target"] == Dockerfile.read().stages[-1].name, "the default (last) stage"
    load(config_file=None, environ=env, flags={})  # every FERRYMAN_* variable is a valid setting
    consul = HostPort.parse(env["FERRYMAN_CONSUL_ADDR"])
    assert consul.host == "consul" and consul.port == 8500
    listen, admin = HostPort.parse(env["FERRYMAN_LISTEN"]), HostPort.parse(env["FERRYMAN_ADMIN_LISTEN"])
    assert admin.host == "0.0.0.0", "Prometheus and the healthcheck reach the admin port from outside its loopback"
    ports = _published(ferryman)
    assert listen.port in ports and admin.port in ports
    code = _healthcheck_code(ferryman["healthcheck"]["test"])
    compile(code, "healthcheck", "exec")
    assert f"http://127.0.0.1:{admin.port}/ready" in code
    assert ferryman["depends_on"]["consul"]["condition"] == "service_healthy"


def test_published_host_ports_do_not_clash(compose: dict[str, Any]) -> None:
    host_ports = [p for service in compose["services"].values() for p in _published(service).values()]
    assert len(host_ports) == len(set(host_ports)), sorted(host_ports)
    # Each on its own default port: Prometheus on 9090, Ferryman's admin listener on its default (9919).
    admin_default = DEFAULTS.listeners.admin.port
    assert _published(_service(compose, "prometheus")) == {9090: 9090}
    assert _published(_service(compose, "ferryman")) == {8080: 8080, admin_default: admin_default}


def test_prometheus_scrapes_the_port_ferryman_listens_on(compose: dict[str, Any]) -> None:
    mounts = _mounts(_service(compose, "prometheus"))
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert config_path == REPO / "compose" / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "ferryman"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("honor_labels", False) is False, "the dashboard relies on exported_instance (grafana/README.md)"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    admin = HostPort.parse(_service(compose, "ferryman")["environment"]["FERRYMAN_ADMIN_LISTEN"])
    assert targets == [f"ferryman:{admin.port}"]

    local = Path(sys.executable).parent / "promtool"  # where `make test` unpacks Debian's prometheus package
    promtool = str(local) if os.access(local, os.X_OK) else shutil.which("promtool")
    if promtool is None:
        pytest.fail("no promtool in the venv or on PATH: `make test-debs` unpacks Debian's prometheus package")
    result = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _dashboard_the_tests_prove() -> Path:
    """DASHBOARD as tests/integration/test_dashboard.py defines it (`REPO / "grafana" / ...`)."""
    source = (REPO / "tests" / "integration" / "test_dashboard.py").read_text()
    match = re.search(r"^DASHBOARD = REPO((?: / \"[^\"]+\")+)$", source, re.M)
    assert match, "tests/integration/test_dashboard.py no longer defines DASHBOARD = REPO / ..."
    return REPO.joinpath(*re.findall(r"\"([^\"]+)\"", match.group(1)))


def test_grafana_provisioning_points_at_files_that_exist(compose: dict[str, Any]) -> None:
    grafana = _service(compose, "grafana")
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == REPO / "grafana" / "provisioning" and provisioning.is_dir()

    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    url = urlsplit(datasources[0]["url"])
    assert url.hostname == "prometheus" and url.hostname in compose["services"]
    prometheus_listen = 9090  # the prom/prometheus image's --web.listen-address
    assert url.port == prometheus_listen and prometheus_listen in _published(_service(compose, "prometheus"))

    providers = yaml.safe_load((provisioning / "dashboards" / "ferryman.yml").read_text())["providers"]
    path = providers[0]["options"]["path"]
    assert path in mounts, f"the dashboard provider reads {path}, which is not mounted"
    dashboards = mounts[path]
    assert dashboards.is_dir()
    assert (dashboards / "ferryman.json").resolve() == _dashboard_the_tests_prove().resolve()
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["ferryman.json"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/ferryman.json"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def _demo_backend_module() -> Any:
    spec = importlib.util.spec_from_file_location("demo_backend_under_test", REPO / "demo" / "backend.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _make_demo_backends() -> list[tuple[str, tuple[str, ...]]]:
    """(service, tags) of each backend demo/run.py (`make demo`) starts."""
    tree = ast.parse((REPO / "demo" / "run.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "backends" for t in node.targets):
            return [(service, tuple(tags)) for service, _, tags in ast.literal_eval(node.value)]
    raise AssertionError("demo/run.py no longer has its `backends` list")


def test_demo_services_run_the_code_make_demo_runs(compose: dict[str, Any]) -> None:
    parser = _demo_backend_module().build_parser()
    stages = {stage.name: stage for stage in Dockerfile.read().stages}
    registered = []
    for name in DEMO_SERVICES:
        service = _service(compose, name)
        assert service["build"]["target"] == "demo"
        assert any(c.sources == ["demo"] for c in stages["demo"].copies), "the demo stage carries demo/"
        argv = _command(service.get("entrypoint")) + _command(service.get("command"))
        assert argv[:3] == ["python", "-m", "demo.backend"], argv
        args = parser.parse_args(argv[3:])
        assert args.check == "http", f"{name}: Consul runs an HTTP check against the container"
        assert args.advertise == name, f"{name}: registered under the name Consul and Ferryman resolve"
        assert args.id == name
        assert args.listen == "0.0.0.0"
        assert (args.advertise_port or args.port) == args.port and args.port in _published(service)
        assert service["environment"]["CONSUL_HTTP_ADDR"] == "consul:8500"
        assert service["depends_on"]["consul"]["condition"] == "service_healthy"
        assert service.get("init") is True, "PID 1 gets SIGTERM through an init: the backend deregisters"
        registered.append((args.service, tuple(args.tag)))
    assert Counter(registered) == Counter(_make_demo_backends())


def test_consul_is_healthy_only_with_a_leader(compose: dict[str, Any]) -> None:
    consul = _service(compose, "consul")
    command = _command(consul["command"])
    assert command[0] == "agent" and "-client" in command and command[command.index("-client") + 1] == "0.0.0.0"
    assert _published(consul) == {8500: 8500}
    assert "leader" in " ".join(consul["healthcheck"]["test"])


# --- Dockerfile -----------------------------------------------------------------------------------------------

@dataclass
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    @property
    def copies(self) -> list[Copy]:
        out = []
        for kind, args in self.instructions:
            if kind != "COPY":
                continue
            words = shlex.split(args)
            flags = dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)
            paths = [w for w in words if not w.startswith("--")]
            out.append(Copy(paths[:-1], paths[-1], flags.get("from")))
        return out


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def stage_names(self) -> set[str]:
        return {stage.name for stage in self.stages}

    @classmethod
    def read(cls) -> Dockerfile:
        logical: list[str] = []
        pending = ""
        for line in DOCKERFILE.read_text().splitlines():
            if line.lstrip().startswith("#"):
                continue  # comments, also inside a continued instruction
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            pending += line
            if pending.strip():
                logical.append(pending.strip())
            pending = ""
        assert not pending.strip(), "the Dockerfile ends in a line continuation"
        args: dict[str, str] = {}
        stages: list[Stage] = []
        for text in logical:
            kind, _, rest = text.partition(" ")
            kind, rest = kind.upper(), rest.strip()
            if kind == "FROM":
                words = [w for w in rest.split() if not w.startswith("--")]
                base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], words[0])
                name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
                stages.append(Stage(name, base))
            elif not stages:
                assert kind == "ARG", f"only ARG may come before the first FROM, not {kind}"
                key, _, default = rest.partition("=")
                args[key] = default
            else:
                stages[-1].instructions.append((kind, rest))
        return cls(args, stages)

    def chain(self, stage: Stage) -> list[Stage]:
        """The stage and the stages it is built FROM, nearest first."""
        by_name = {s.name: s for s in self.stages}
        out = [stage]
        while out[-1].base in by_name:
            out.append(by_name[out[-1].base])
        return out

    def effective(self, stage: Stage, kind: str) -> str | None:
        """The last `kind` instruction in force in `stage` (inherited from the stages it is built on)."""
        for s in self.chain(stage):
            found = [args for k, args in s.instructions if k == kind]
            if found:
                return found[-1]
        return None

    def env(self, stage: Stage) -> dict[str, str]:
        out: dict[str, str] = {}
        for s in reversed(self.chain(stage)):
            for kind, args in s.instructions:
                if kind == "ENV":
                    for word in shlex.split(args):
                        key, _, value = word.partition("=")
                        out[key] = value
        return out


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_dockerfile_stages_and_base_image() -> None:
    dockerfile = Dockerfile.read()
    assert [s.name for s in dockerfile.stages] == ["build", "runtime", "demo", "ferryman"]
    for stage in dockerfile.stages:
        base = dockerfile.chain(stage)[-1].base
        match = re.fullmatch(r"python:3\.(\d+)-slim(-\w+)?", base)
        assert match and int(match.group(1)) >= 11, f"{stage.name}: a pinned slim Python >= 3.11 base, not {base}"


def test_dockerfile_entrypoint_is_ferryman_and_healthcheck_asks_ready() -> None:
    dockerfile = Dockerfile.read()
    final = dockerfile.stages[-1]
    assert _exec_form(dockerfile.effective(final, "ENTRYPOINT") or "null") == ["ferryman"]
    healthcheck = dockerfile.effective(final, "HEALTHCHECK") or ""
    options, _, command = healthcheck.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), healthcheck
    code = _healthcheck_code(["CMD", *_exec_form(command)])
    compile(code, "HEALTHCHECK", "exec")
    assert "/ready" in code and "FERRYMAN_ADMIN_LISTEN" in code
    env = dockerfile.env(final)
    load(config_file=None, environ=env, flags={})  # every FERRYMAN_* variable is a valid setting
    assert HostPort.parse(env["FERRYMAN_ADMIN_LISTEN"]).host == "0.0.0.0"
    exposed = {int(p.split("/")[0]) for p in (dockerfile.effective(final, "EXPOSE") or "").split()}
    assert exposed == {HostPort.parse(env["FERRYMAN_LISTEN"]).port, HostPort.parse(env["FERRYMAN_ADMIN_LISTEN"]).port}
    # The image keeps Ferryman's default admin port, and the healthcheck falls back to it.
    admin_default = DEFAULTS.listeners.admin.port
    assert HostPort.parse(env["FERRYMAN_ADMIN_LISTEN"]).port == admin_default
    assert f"'FERRYMAN_ADMIN_LISTEN', ':{admin_default}'" in code


def test_dockerfile_runs_as_a_user_that_is_not_root() -> None:
    dockerfile = Dockerfile.read()
    for name in ("ferryman", "demo"):
        stage = next(s for s in dockerfile.stages if s.name == name)
        user = dockerfile.effective(stage, "USER")
        assert user, f"stage {name} sets no USER: it would run as root"
        assert user.split(":")[0] not in ROOT_USERS, f"stage {name} runs as {user}"
    demo = next(s for s in dockerfile.stages if s.name == "demo")
    assert _exec_form(dockerfile.effective(demo, "ENTRYPOINT") or "null") == ["python", "-m", "demo.backend"]


def test_dockerfile_installs_ferryman_non_editable_with_what_pyproject_needs() -> None:
    dockerfile = Dockerfile.read()
    build = dockerfile.stages[0]
    runs = " && ".join(args for kind, args in build.instructions if kind == "RUN")
    install = re.search(r"pip install ([^&]*)", runs)
    assert install, "the build stage pip-installs Ferryman"
    words = install.group(1).split()
    assert "." in words and "-e" not in words and "--editable" not in words, install.group(0)
    assert "--no-cache-dir" in words
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]
    needed = {"pyproject.toml", pyproject["project"]["readme"], *(p.split(".")[0] for p in packages)}
    copied = {src.rstrip("/") for c in build.copies for src in c.sources}
    assert needed <= copied, f"the build stage does not copy {sorted(needed - copied)}"
    runtime = dockerfile.stages[1]
    assert [(c.from_stage, c.sources) for c in runtime.copies] == [("build", ["/opt/ferryman"])]


def test_pyproject_lists_every_package_a_regular_install_needs() -> None:
    """Each directory of discovery/ and proxy/ with an __init__.py is a listed package: pip install . (the
    image) installs only those, and a missing subpackage fails at import inside the container."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    found = {init.parent.relative_to(REPO).as_posix().replace("/", ".")
             for top in ("discovery", "proxy") for init in (REPO / top).rglob("__init__.py")}
    assert found == listed


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus `**`) as a regular expression."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        else:
            out.append({"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])))
            i += 1
    return re.compile("".join(out))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    copied = [src for stage in Dockerfile.read().stages for c in stage.copies if c.from_stage is None
              for src in c.sources]
    for src in copied:
        path = REPO / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        kept = [f for f in files if not _ignored(f.relative_to(REPO).as_posix(), patterns)]
        assert kept, f"COPY {src}: .dockerignore leaves nothing of it in the build context"
        assert all("__pycache__" not in f.parts for f in kept)
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/unit/test_compose.py", "bench/run.py",
                     "grafana/dashboards/ferryman.json"):
        assert _ignored(unwanted, patterns), f"{unwanted} would be sent to the Docker engine"
