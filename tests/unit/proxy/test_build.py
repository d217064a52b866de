"""Which build runs is visible: `ferryman --version`, /api/status, the status page and the `ferryman_started`
log line all say "compiled: mypyc, N modules" or "pure Python", and they say it of the build under test
(`FERRYMAN_BUILD`, which `make test` sets to `compiled` for the whole suite and to `pure` for the second unit
run). A build that does not match its source is never loaded."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import proxy
from proxy import BUILD, build, compiled
from proxy.admin import status_document
from proxy.app import Ferryman
from proxy.config import DEFAULTS
from proxy.listener import Router
from proxy.state import Report

from .test_app import FakeSource

ROOT = Path(__file__).resolve().parents[3]
REQUESTED = os.environ.get("FERRYMAN_BUILD", "auto")


def expected() -> str:
    """What the build under test must call itself."""
    if REQUESTED == "compiled":
        return f"compiled: mypyc, {len(compiled.MODULES)} modules"
    if REQUESTED == "pure":
        return "pure Python"
    return BUILD.describe()  # auto: whichever was found, checked for consistency below


class TestTheBuildUnderTest:
    """The build FERRYMAN_BUILD asked for is the one that runs, and every place that names it agrees."""

    def test_the_modules_come_from_the_build_asked_for(self) -> None:
        assert BUILD.describe() == expected()
        for name in compiled.MODULES:
            file = str(importlib.import_module(name).__file__)
            if BUILD.compiled:
                assert file.startswith(str(compiled.BUILD_DIR)) and file.endswith(".so"), name
            else:
                assert file == str(compiled.source_path(name)), name

    def test_version_says_which_build(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "FERRYMAN_BUILD"}
        if REQUESTED != "auto":
            env["FERRYMAN_BUILD"] = REQUESTED
        out = subprocess.run([sys.executable, "-m", "proxy.cli", "--version"], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=60, check=True).stdout
        assert out == f"ferryman {proxy.__version__} ({expected()})\n"

    def test_status_document_says_which_build(self) -> None:
        document = status_document(Router(), Report(), "127.0.0.1:8500", 60.0, 0.0)
        build = json.loads(json.dumps(document))["build"]
        assert build["describe"] == expected()
        assert build["compiled"] is BUILD.compiled
        assert build["modules"] == (list(compiled.MODULES) if BUILD.compiled else [])

    def test_status_page_shows_it_beside_the_version(self) -> None:
        page = (ROOT / "proxy" / "static" / "status.html").read_text()
        assert 'id="build"' in page and "s.build.describe" in page

    async def test_the_start_is_logged_with_the_build(self) -> None:
        ferryman = Ferryman(DEFAULTS, serve_proxy=False, serve_admin=False, make_source=FakeSource)
        with capture_logs() as logs:
            await ferryman.start()
            await ferryman.stop()
        started = [e for e in logs if e["event"] == "ferryman_started"]
        assert len(started) == 1 and started[0]["build"] == expected()


class TestSelection:
    """`select` loads a compiled build only when it exists, fits this interpreter and matches the source."""

    def write(self, build_dir: Path, **changes: object) -> None:
        manifest: dict[str, object] = {
            "compiler": "mypyc 0", "cache_tag": sys.implementation.cache_tag,
            "modules": {"proxy.headers": "proxy/headers.so"}, "libraries": {},
            "sources": {"proxy.headers": compiled.source_hash("proxy.headers")}, "tree": compiled.tree_hash(),
        }
        manifest.update(changes)
        build_dir.mkdir(exist_ok=True)
        (build_dir / "manifest.json").write_text(json.dumps(manifest))

    @pytest.mark.parametrize(("changes", "why"), [
        ({"cache_tag": "cpython-20"}, "compiled for cpython-20"),
        ({"sources": {"proxy.headers": "0" * 64}, "tree": "0" * 64}, "proxy/headers.py changed since the build"),
        ({"tree": "0" * 64}, "a module of proxy/ or discovery/ changed since the build"),
    ], ids=["other-python", "edited-source", "edited-interpreted-module"])
    def test_a_build_that_does_not_fit_is_not_loaded(self, tmp_path: Path, changes: dict[str, object],
                                                     why: str) -> None:
        self.write(tmp_path, **changes)
        finders = list(sys.meta_path)
        build = compiled.select({}, tmp_path)
        assert not build.compiled and why in build.why_pure and build.describe() == "pure Python"
        assert sys.meta_path == finders
        with pytest.raises(ImportError, match=why):
            compiled.select({"FERRYMAN_BUILD": "compiled"}, tmp_path)

    def test_the_tree_hash_covers_every_module_of_both_packages_but_the_build(self, tmp_path: Path) -> None:
        """An edit to any module of proxy/ or discovery/ changes the hash (mypyc copies constants and types from
        interpreted modules into compiled ones); the build's own files do not."""
        for name in ("discovery/model.py", "proxy/proxyproto.py", "proxy/h2/codec.py", "proxy/_mypyc/x.py"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text("LIMIT: Final = 5\n")
        first = compiled.tree_hash(tmp_path)
        (tmp_path / "proxy/_mypyc/x.py").write_text("changed\n")
        assert compiled.tree_hash(tmp_path) == first
        for name in ("discovery/model.py", "proxy/proxyproto.py", "proxy/h2/codec.py"):
            (tmp_path / name).write_text("LIMIT: Final = 6\n")
            assert compiled.tree_hash(tmp_path) != first, name
            (tmp_path / name).write_text("LIMIT: Final = 5\n")
        (tmp_path / "proxy/new.py").write_text("\n")
        assert compiled.tree_hash(tmp_path) != first

    def test_no_build_is_pure_python(self, tmp_path: Path) -> None:
        build = compiled.select({}, tmp_path)
        assert not build.compiled and "no compiled build" in build.why_pure

    def test_pure_is_chosen_whatever_is_built(self, tmp_path: Path) -> None:
        self.write(tmp_path)
        finders = list(sys.meta_path)
        assert compiled.select({"FERRYMAN_BUILD": "pure"}, tmp_path).why_pure == "FERRYMAN_BUILD=pure"
        assert sys.meta_path == finders

    def test_an_unknown_choice_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(ImportError, match="FERRYMAN_BUILD='fast'"):
            compiled.select({"FERRYMAN_BUILD": "fast"}, tmp_path)


class TestBuildWithoutACompiler:
    """Without a C compiler `python -m proxy.build` says why and leaves pure Python, failing only with --require."""

    @pytest.mark.parametrize(("args", "status"), [([], 0), (["--require"], 1)], ids=["optional", "required"])
    def test_no_compiler_is_said_and_pure_python_stays(self, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], args: list[str],
                                                       status: int) -> None:
        monkeypatch.setattr(sysconfig, "get_config_var",
                            lambda name: "no-such-cc -pthread" if name == "CC" else None)
        before = sorted(p.name for p in compiled.BUILD_DIR.glob("*"))
        assert build.main(["--force", *args]) == status
        err = capsys.readouterr().err
        assert "no C compiler (no-such-cc" in err and "the pure-Python build runs" in err
        assert sorted(p.name for p in compiled.BUILD_DIR.glob("*")) == before  # nothing built, nothing removed
