"""Stand-ins for the public images of docker-compose.yml, built from Debian packages (none can be pulled here).

How it works: `debootstrap --variant=minbase` (Debian's, unpacked into .venv/debs by `make compose-debs`, run
with DEBOOTSTRAP_DIR) makes two root filesystems from the mirror the host's apt uses, in parallel: a bare one
(`ferryman-standin/debian`), and one with python3-venv for the Python base the Dockerfile names in its
`ARG PYTHON_IMAGE` default (so the Dockerfile is built as it is). The Python base carries the host's CA bundle,
so pip in the image build reaches the package index the way pip on the host does. Each is trimmed (no .debs,
apt lists, docs) and imported with `docker import`. On the bare one, two small Dockerfiles give the Consul
binary of `make consul` as `hashicorp/consul:<tag>` and Debian's Prometheus as `prom/prometheus:<tag>`, with the
entrypoint, default command, user and VOLUME of the real images, so the compose file runs unchanged.

Every image carries a label with a hash of its recipe (this module's recipe text, the packages, the files put
in it); an image whose label matches is reused, so only a changed recipe is built again. debootstrap's .debs
are kept in STATE/debs across runs. Grafana has no stand-in: the test's override file leaves it out.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .engine import REPO, STATE, UNPACKED, DockerEngine

LABEL = "org.ferryman.standin.recipe"
RECIPE_VERSION = "1"  # part of every recipe's hash: raise it when how the images are made changes
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What is removed from a fresh root filesystem before it becomes an image: nothing a container runs needs it.
TRIM = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info",
        "debootstrap")


class StandinUnavailable(Exception):
    """A stand-in cannot be built here; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class Rootfs:
    """An image made by debootstrap and `docker import`."""

    tag: str
    include: tuple[str, ...]
    changes: tuple[str, ...]  # Dockerfile instructions `docker import --change` applies
    files: dict[str, Path] = field(default_factory=dict)  # path in the image -> host file copied there


@dataclass(frozen=True, slots=True)
class Built:
    """An image built with a Dockerfile from a stand-in base, with files of the host in its context."""

    tag: str
    dockerfile: str
    files: dict[str, Path]


def compose_image(service: str) -> str:
    """The image docker-compose.yml names for a service."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    image: str = compose["services"][service]["image"]
    return image


def dockerfile_base() -> str:
    """The default of the Dockerfile's `ARG PYTHON_IMAGE`: the base Ferryman's image is built on."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    if match is None:
        raise StandinUnavailable("the Dockerfile no longer has `ARG PYTHON_IMAGE=<image>`")
    return match.group(1)


def host_codename() -> str:
    release = Path("/etc/os-release").read_text()
    match = re.search(r"^VERSION_CODENAME=(\w+)$", release, re.M)
    if match is None or "ID=debian" not in release:
        raise StandinUnavailable("the stand-in images are made with debootstrap from the host's Debian mirror: "
                                 "this host is not Debian")
    return match.group(1)


def host_mirror(codename: str) -> str:
    """The Debian mirror the host's apt reads `<codename> main` from."""
    out = subprocess.run(["apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(COMPONENT)"],
                         capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        uri, release, component = ([*line.split(), "", "", ""])[:3]
        if release == codename and component == "main":
            return uri
    raise StandinUnavailable(f"the host's apt knows no mirror of `{codename} main` (run apt-get update)")


def recipes() -> tuple[Rootfs, Rootfs, list[Built]]:
    """The bare Debian base, the Python base, and the images built on the bare base."""
    base = Rootfs("ferryman-standin/debian:minbase", (), ('CMD ["bash"]',))
    python = Rootfs(dockerfile_base(), ("python3-venv", "python-is-python3", "ca-certificates"),
                    ("ENV LANG=C.UTF-8", 'CMD ["python3"]'),
                    {"etc/ssl/certs/ca-certificates.crt": HOST_CA_BUNDLE})
    consul = Built(compose_image("consul"), f"""FROM {base.tag}
# hashicorp/consul: `consul` first, agent -dev by default, a consul user, /consul/data a volume.
COPY consul /bin/consul
RUN useradd --system --user-group --no-create-home consul && mkdir -p /consul/data /consul/config \\
 && chown consul:consul /consul/data /consul/config
USER consul
VOLUME /consul/data
EXPOSE 8300 8301 8301/udp 8302 8302/udp 8500 8600 8600/udp
ENTRYPOINT ["consul"]
CMD ["agent", "-dev", "-client", "0.0.0.0"]
""", {"consul": REPO / ".venv" / "bin" / "consul"})
    prometheus = Built(compose_image("prometheus"), f"""FROM {base.tag}
# prom/prometheus: /bin/prometheus as user nobody, its default config and arguments, /prometheus a volume.
COPY prometheus /bin/prometheus
COPY prometheus.yml /etc/prometheus/prometheus.yml
RUN mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
VOLUME ["/prometheus"]
WORKDIR /prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
""", {"prometheus": UNPACKED / "usr/bin/prometheus", "prometheus.yml": UNPACKED / "etc/prometheus/prometheus.yml"})
    return base, python, [consul, prometheus]


def _digest(*parts: str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def rootfs_key(rootfs: Rootfs, codename: str) -> str:
    files = [p for item in sorted(rootfs.files.items()) for p in (item[0], item[1])]
    return _digest(RECIPE_VERSION, codename, *TRIM, rootfs.tag, *rootfs.include, *rootfs.changes, *files)


def built_key(image: Built, base_key: str) -> str:
    files = [p for item in sorted(image.files.items()) for p in (item[0], item[1])]
    return _digest(base_key, image.tag, image.dockerfile, *files)


def _label(engine: DockerEngine, tag: str) -> str:
    result = engine.docker("image", "inspect", "--format", f'{{{{ index .Config.Labels "{LABEL}" }}}}', tag,
                           check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def _unmount_under(path: Path) -> None:
    """Unmount what debootstrap may have left mounted inside a root filesystem (it mounts /proc and /sys)."""
    inside = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4].startswith(f"{path}/")]
    for mount in sorted(inside, key=len, reverse=True):
        subprocess.run(["umount", "--lazy", mount], check=False)


def _remove_tree(path: Path) -> None:
    _unmount_under(path)
    if not any(line.split()[4].startswith(f"{path}/")
               for line in Path("/proc/self/mountinfo").read_text().splitlines()):
        shutil.rmtree(path, ignore_errors=True)


def _debootstrap(rootfs: Rootfs, codename: str, mirror: str, target: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [str(UNPACKED / "usr/sbin/debootstrap"), "--variant=minbase", f"--cache-dir={STATE / 'debs'}"]
    if rootfs.include:
        command.append(f"--include={','.join(rootfs.include)}")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBOOTSTRAP_DIR": str(UNPACKED / "usr/share/debootstrap"),
           "LANG": "C.UTF-8"}
    (STATE / "debs").mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen([*command, codename, str(target), mirror], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _import(engine: DockerEngine, rootfs: Rootfs, target: Path, key: str) -> None:
    for rel in TRIM:
        path = target / rel
        if path.is_dir():
            for child in path.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for rel, source in rootfs.files.items():
        shutil.copyfile(source, target / rel)
    changes = [a for change in (*rootfs.changes, f"LABEL {LABEL}={key}") for a in ("--change", change)]
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(target), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    imported = subprocess.run([str(UNPACKED / "usr/bin/docker"), "import", *changes, "-", rootfs.tag],
                              stdin=tar.stdout, env=engine.env(), capture_output=True, text=True, check=False)
    tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise StandinUnavailable(f"importing {rootfs.tag} failed: {imported.stderr}")


def _make_rootfs(engine: DockerEngine, wanted: list[tuple[Rootfs, str]], codename: str) -> None:
    """debootstrap every wanted root filesystem at once, then import each."""
    mirror = host_mirror(codename)
    work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=STATE))
    try:
        runs = []
        for i, (rootfs, key) in enumerate(wanted):
            target, log = work / f"root{i}", work / f"debootstrap{i}.log"
            runs.append((rootfs, key, target, log, _debootstrap(rootfs, codename, mirror, target, log)))
        for rootfs, _, _, log, proc in runs:
            if proc.wait(timeout=900) != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                raise StandinUnavailable(f"debootstrap of {rootfs.tag} failed ({log}):\n{tail}")
        for rootfs, key, target, _, _ in runs:
            _import(engine, rootfs, target, key)
    finally:
        _remove_tree(work)


def _build(engine: DockerEngine, image: Built, key: str) -> None:
    missing = [str(p) for p in image.files.values() if not p.is_file()]
    if missing:
        raise StandinUnavailable(f"{image.tag}: missing {', '.join(missing)} (`make consul test-debs` puts them)")
    with tempfile.TemporaryDirectory(prefix="standin-", dir=STATE) as context:
        (Path(context) / "Dockerfile").write_text(image.dockerfile)
        for name, source in image.files.items():
            shutil.copy2(source, Path(context) / name)
        engine.docker("build", "-q", "--label", f"{LABEL}={key}", "-t", image.tag, context, timeout=600)


def ensure_standins(engine: DockerEngine, say: Callable[[str], None] = print) -> dict[str, float]:
    """Build what is missing or stale; returns seconds spent per image built (empty when all were cached)."""
    codename = host_codename()
    base, python, built = recipes()
    keys = {rootfs.tag: rootfs_key(rootfs, codename) for rootfs in (base, python)}
    spent: dict[str, float] = {}
    wanted = [(r, keys[r.tag]) for r in (base, python) if _label(engine, r.tag) != keys[r.tag]]
    if wanted:
        say(f"debootstrap: {', '.join(r.tag for r, _ in wanted)}")
        started = time.monotonic()
        _make_rootfs(engine, wanted, codename)
        spent["debootstrap " + " ".join(r.tag for r, _ in wanted)] = time.monotonic() - started
    for image in built:
        key = built_key(image, keys[base.tag])
        if _label(engine, image.tag) != key:
            started = time.monotonic()
            _build(engine, image, key)
            spent[image.tag] = time.monotonic() - started
    return spent


def image_size(engine: DockerEngine, tag: str) -> int:
    return int(engine.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

