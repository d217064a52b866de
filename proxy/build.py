"""`python -m proxy.build`: compile the hot path (`proxy.compiled.MODULES`) with mypyc, or say why not.

How it works. mypyc (part of mypy, the dev extra) type-checks the modules with the project's mypy settings and
writes C for them into build/mypyc/ (git ignores build/); setuptools' build_ext compiles that with the
interpreter's C compiler into one shared library (`ferryman__mypyc`, where calls between the modules stay native)
and a small extension per module. The results replace `proxy/_mypyc/` whole, with a manifest holding each compiled
source's SHA-256 and one over every module of proxy/ and discovery/, which `proxy/compiled.py` checks before it
loads anything from there. Without a C compiler, Python's headers or mypyc this prints why and leaves the pure-
Python build in place (exit status 0, or 1 with --require, for builds that must ship compiled code such as the
container image). A build that is still current is not redone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from .compiled import BUILD_DIR, MANIFEST, MODULES, ROOT, read_manifest, source_hash, source_path, tree_hash

WORK_DIR: Final = ROOT / "build" / "mypyc"
GROUP: Final = "ferryman"  # mypyc's shared library is then the top-level module `ferryman__mypyc`


def missing_tools() -> str:
    """Why this machine cannot compile, or "" when it can."""
    if importlib.util.find_spec("mypyc") is None:
        return "mypyc is not installed (it comes with mypy: pip install mypy)"
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}; on Debian: apt-get install gcc)"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return f"no Python headers ({include}/Python.h; on Debian: apt-get install python3-dev)"
    return ""


def compile_modules(modules: Sequence[str], jobs: int) -> dict[str, object]:
    """Compile `modules` into a fresh BUILD_DIR; returns the manifest written there."""
    from mypy.version import __version__ as mypy_version  # build-time only: mypy is not a runtime dependency
    from mypyc.build import mypycify
    from setuptools import Distribution

    sources = {module: source_hash(module) for module in modules}  # before mypyc reads them
    tree = tree_hash()
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    os.chdir(ROOT)  # mypy reads the project's settings (pyproject.toml) and names modules from here
    extensions = mypycify([str(source_path(m).relative_to(ROOT)) for m in modules], opt_level="3",
                          target_dir=str(WORK_DIR / "c"), group_name=GROUP)
    # build_ext alone, without setup(): setup() would read this project's pyproject.toml as a package's.
    dist = Distribution({"name": "ferryman-compiled", "ext_modules": extensions})
    build_ext: Any = dist.get_command_obj("build_ext")  # its options are build_ext's own attributes
    build_ext.build_lib = str(WORK_DIR / "lib")
    build_ext.build_temp = str(WORK_DIR / "temp")
    build_ext.parallel = jobs
    dist.run_command("build_ext")
    lib = WORK_DIR / "lib"
    staged = BUILD_DIR.with_name(BUILD_DIR.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(lib, staged)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    files = {module: str(Path(*module.split(".")).with_suffix("")) + suffix for module in modules}
    library = f"{GROUP}__mypyc"
    for file in [*files.values(), library + suffix]:
        if not (staged / file).is_file():
            raise RuntimeError(f"mypyc built no {file}")
    manifest: dict[str, object] = {
        "compiler": f"mypyc {mypy_version}", "cache_tag": sys.implementation.cache_tag, "modules": files,
        "libraries": {library: library + suffix}, "sources": sources,
        "tree": tree,
    }
    (staged / MANIFEST.name).write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(BUILD_DIR, ignore_errors=True)
    staged.rename(BUILD_DIR)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m proxy.build",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--require", action="store_true", help="fail (exit 1) when the build cannot be compiled")
    ap.add_argument("--force", action="store_true", help="compile even when the build is current")
    ap.add_argument("--clean", action="store_true", help="remove the compiled build (pure Python from then on)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="C compilers run at once")
    args = ap.parse_args(argv)
    if args.clean:
        shutil.rmtree(BUILD_DIR, ignore_errors=True)
        shutil.rmtree(WORK_DIR, ignore_errors=True)
        print("ferryman build: compiled build removed: pure Python")
        return 0
    manifest, _ = read_manifest()
    if manifest is not None and not args.force and sorted(manifest.get("modules", {})) == sorted(MODULES):
        print(f"ferryman build: compiled ({manifest['compiler']}, {len(MODULES)} modules), up to date")
        return 0
    why = missing_tools()
    if why:
        print(f"ferryman build: {why}: the pure-Python build runs", file=sys.stderr)
        return 1 if args.require else 0
    started = time.monotonic()
    try:
        manifest = compile_modules(MODULES, args.jobs)
    except Exception as exc:  # any failure of the compiler leaves the pure build, said once
        print(f"ferryman build: compiling failed ({type(exc).__name__}: {exc}): the pure-Python build runs",
              file=sys.stderr)
        return 1 if args.require else 0
    print(f"ferryman build: compiled {len(MODULES)} modules with {manifest['compiler']} in "
          f"{time.monotonic() - started:.0f} s into {BUILD_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
