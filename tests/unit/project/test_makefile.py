"""`make test` and `make bench` start or enable no system service: Debian packages that ship one (prometheus,
nginx, haproxy, caddy) are unpacked into .venv with `dpkg-deb -x`, never installed; apt installs only packages
that ship none. Read from the Makefile's text (the unpacked binaries are exercised by the integration tests
that run Prometheus and promtool from .venv/bin)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

MAKEFILE = Path(__file__).resolve().parents[3] / "Makefile"
# Debian packages whose installation starts (and enables) a system service: a systemd unit or an init script.
SHIP_A_SERVICE = ("prometheus", "nginx", "nginx-light", "nginx-core", "nginx-full", "nginx-common", "haproxy",
                  "caddy", "docker.io", "containerd", "consul", "grafana")


def _text() -> str:
    return MAKEFILE.read_text()


def _variable(name: str) -> list[str]:
    match = re.search(rf"^{name}\s*:?=\s*(.*)$", _text(), re.M)
    assert match, f"the Makefile no longer defines {name}"
    return match.group(1).split()


def _apt_installed() -> list[str]:
    """Every package named by an APT_ENSURE call: the only way the Makefile runs `apt-get install`."""
    packages: list[str] = []
    for argument in re.findall(r"\$\(call APT_ENSURE,([^)]*\)?)\)", _text()):
        variable = re.fullmatch(r"\$\((\w+)\)", argument.strip())
        packages += _variable(variable.group(1)) if variable else argument.split()
    return packages


def test_apt_get_install_appears_only_in_apt_ensure() -> None:
    """`apt-get install` is written once, in APT_ENSURE, without recommended packages (docker.io for one)."""
    lines = [line for line in _text().splitlines()
             if re.search(r"apt-get install", line) and not re.search(r"echo .*apt-get install", line)]
    assert len(lines) == 1 and "--no-install-recommends" in lines[0], lines


@pytest.mark.parametrize("package", SHIP_A_SERVICE)
def test_no_package_that_ships_a_service_is_installed(package: str) -> None:
    """No APT_ENSURE call installs a package that would start a system service."""
    assert package not in _apt_installed()


def test_the_test_target_installs_only_chromium_and_docker_compose() -> None:
    """`make test` apt-installs chromium and docker-compose only, and unpacks prometheus into .venv."""
    assert sorted(_apt_installed()) == ["chromium", "docker-compose"]
    assert re.search(r"^\t\$\(UNPACK_DEB\) prometheus prometheus promtool$", _text(), re.M)
    assert re.search(r"^test-debs:.*\$\(VENV\)/bin/promtool", _text(), re.M)


@pytest.mark.parametrize("package", ["wrk", "nginx-light", "haproxy", "caddy"])
def test_bench_tools_are_unpacked(package: str) -> None:
    """`make bench` unpacks each of its Debian tools into .venv instead of installing it."""
    assert re.search(rf"^\t\$\(UNPACK_DEB\) {re.escape(package)} \w+$", _text(), re.M)


def test_unpacking_runs_no_maintainer_script() -> None:
    """The unpack script extracts with `dpkg-deb -x` and never calls dpkg -i, apt-get install or systemctl."""
    script = re.search(r"^define UNPACK_DEB_SH\n(.*?)^endef$", _text(), re.M | re.S)
    assert script
    body = script.group(1)
    assert "dpkg-deb -x" in body
    for forbidden in ("dpkg -i", "dpkg --install", "apt-get install", "apt install", "systemctl", "service "):
        assert forbidden not in body, forbidden


@pytest.mark.parametrize("package", ["chromium", "docker-compose"])
def test_the_apt_installed_packages_ship_no_service(package: str) -> None:
    """Where a package is installed here, its file list holds no systemd unit and no init script."""
    if shutil.which("dpkg") is None:
        pytest.skip("not a Debian system")
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        pytest.skip(f"{package} is not installed here")
    services = [f for f in listing.stdout.splitlines() if re.search(r"/systemd/system/|^/etc/init\.d/", f)]
    assert services == []


def test_the_compose_test_unpacks_its_engine_and_debootstrap_and_make_test_runs_it() -> None:
    """`make compose-test` unpacks docker.io (with containerd, runc, tini, iptables) and debootstrap into .venv;
    `make test` runs it after the rest of the suite, which leaves tests/compose to it, and runs the unit suite
    a second time on the pure-Python build (issue 18)."""
    text = _text()
    assert re.search(r"^\t\$\(UNPACK_DEB\) docker\.io dockerd .*containerd .*runc docker-init xtables-nft-multi$",
                     text, re.M)
    assert re.search(r"^\t\$\(UNPACK_DEB\) debootstrap debootstrap$", text, re.M)
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", text, re.M)
    assert recipe, "no test target"
    lines = recipe.group(1).splitlines()
    assert "--ignore=tests/compose" in lines[0] and lines[-1].strip().endswith("compose-test")
    # The whole suite on the build `make compiled` left (compiled where it could), the unit suite on pure Python.
    assert lines[0].startswith("\tFERRYMAN_BUILD=$$($(BUILD_KIND))")
    assert any("FERRYMAN_BUILD=pure" in line and "pytest -q tests/unit" in line for line in lines)
    assert re.search(r"^test:.* compiled$", text, re.M)
    assert re.search(r"^compose-test:.*compose-debs", text, re.M)
