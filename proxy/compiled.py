"""Which build of the hot path runs: the mypyc-compiled modules or the pure-Python source they are built from.

How it works. `python -m proxy.build` (run by `make venv`, `make compiled` and the Dockerfile) compiles the
modules in `MODULES` with mypyc into `proxy/_mypyc/`, beside a manifest naming each module's extension file and
the SHA-256 of the source it was compiled from, with one over every module of proxy/ and discovery/. The source
stays the single source of truth: nothing is written next to it, so an edited `.py` is never shadowed by an old
`.so`. When the `proxy` package is imported, `select()` reads the manifest and, when the build matches this
interpreter and every source still hashes as it did, puts a finder first on `sys.meta_path` that loads exactly
those modules (and mypyc's shared library) from their extension files; every other module, and all of them in the
pure build, come from source.

`FERRYMAN_BUILD` chooses: `auto` (the default: compiled when a current build is there, else pure Python),
`pure` (always the source) or `compiled` (the compiled build or an ImportError saying why not: what a test of
the compiled build sets so that it cannot pass on the source by accident). `BUILD` says which one runs, for
`ferryman --version`, the status page and the `ferryman_build` log line at start.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any, Final

# The modules compiled, in the order the profile ranks them. A module stays interpreted when mypyc cannot
# build it as it is (route_index.py: its dataclass annotations name table.Route, which does not exist yet
# while table.py imports it) or when nothing per request runs in it.
MODULES: Final = (
    "proxy.h1.client",
    "proxy.proxied",  # its ClientConnection subclass for PROXY protocol listeners
    "proxy.h1.reader",
    "proxy.h1.writer",
    "proxy.h1.head",
    "proxy.h1.upstream",
    "proxy.exchange",
    "proxy.dispatch",
    "proxy.headers",
    "proxy.pool",
    "proxy.balancer",
    "proxy.table",
)
PACKAGE_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = PACKAGE_DIR.parent
BUILD_DIR: Final = PACKAGE_DIR / "_mypyc"
MANIFEST: Final = BUILD_DIR / "manifest.json"
PACKAGES: Final = ("discovery", "proxy")  # every module whose source the manifest's tree hash covers
ENV: Final = "FERRYMAN_BUILD"
CHOICES: Final = ("auto", "pure", "compiled")


def source_path(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def source_hash(module: str) -> str:
    return hashlib.sha256(source_path(module).read_bytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class Build:
    """What runs: `compiled` with the compiler and the modules, or pure Python and why."""

    compiled: bool
    compiler: str = ""  # "mypyc 2.4.1"
    modules: tuple[str, ...] = ()
    why_pure: str = ""

    def describe(self) -> str:
        if self.compiled:
            return f"compiled: {self.compiler.split()[0]}, {len(self.modules)} modules"
        return "pure Python"

    def as_dict(self) -> dict[str, object]:
        return {"compiled": self.compiled, "compiler": self.compiler or None, "modules": list(self.modules),
                "describe": self.describe(), "why_pure": self.why_pure or None}


class CompiledFinder(MetaPathFinder):
    """Finds the compiled modules (and mypyc's shared library) in the build directory, nothing else."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.machinery.ModuleSpec(fullname, loader, origin=str(file))


def tree_hash(root: Path = ROOT) -> str:
    """One SHA-256 over every module of the two packages (names and contents). mypyc copies what compiled code
    imports from interpreted modules into the build (a `Final` constant's value, a field's type that it then
    checks): an edit anywhere in them, not only in a compiled module, makes the build stale."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            if relative.parts[:2] == ("proxy", BUILD_DIR.name):
                continue
            digest.update(str(relative).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def read_manifest(build_dir: Path = BUILD_DIR) -> tuple[dict[str, Any] | None, str]:
    """The manifest of a current build for this interpreter, or None and why there is none."""
    path = build_dir / MANIFEST.name
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "no compiled build (python -m proxy.build makes one)"
    except (OSError, ValueError) as exc:
        return None, f"unreadable manifest {path}: {exc}"
    if manifest.get("cache_tag") != sys.implementation.cache_tag:
        return None, f"compiled for {manifest.get('cache_tag')}, this is {sys.implementation.cache_tag}"
    if manifest.get("tree") != tree_hash():  # (it covers the compiled modules' sources too)
        return None, _what_changed(manifest)
    return manifest, ""


def _what_changed(manifest: dict[str, Any]) -> str:
    """Why a build no longer matches the source: a compiled module's source, named, else some other module."""
    sources: dict[str, str] = manifest.get("sources", {})
    for module in manifest.get("modules", {}):
        try:
            current = source_hash(module)
        except OSError:
            return f"the source of {module} is missing"
        if sources.get(module) != current:
            return f"{source_path(module).relative_to(ROOT)} changed since the build (python -m proxy.build)"
    return "a module of proxy/ or discovery/ changed since the build (python -m proxy.build)"


def select(environ: Mapping[str, str] = os.environ, build_dir: Path = BUILD_DIR) -> Build:
    """Install the compiled modules' finder when a current build is there and FERRYMAN_BUILD allows it."""
    choice = environ.get(ENV, "auto") or "auto"
    if choice not in CHOICES:
        raise ImportError(f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}")
    if choice == "pure":
        return Build(False, why_pure=f"{ENV}=pure")
    manifest, why = read_manifest(build_dir)
    if manifest is None:
        if choice == "compiled":
            raise ImportError(f"{ENV}=compiled, but {why}")
        return Build(False, why_pure=why)
    modules: dict[str, str] = manifest["modules"]  # written by proxy/build.py
    files = {name: build_dir / file for name, file in modules.items()}
    files.update({name: build_dir / file for name, file in manifest.get("libraries", {}).items()})
    sys.meta_path.insert(0, CompiledFinder(files))
    return Build(True, str(manifest.get("compiler", "mypyc")), tuple(modules))


BUILD: Final = select()
