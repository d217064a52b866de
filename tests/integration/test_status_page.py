"""The admin status page (`GET /`), rendered by a real headless Chromium against a real Ferryman and Consul.

The page is static HTML whose JavaScript fetches /api/status and builds the tables, so what Chromium's
`--dump-dom` prints after a few seconds of virtual time is what a user would see. Changing the world in
Consul and dumping again shows the page follows live data rather than anything baked into the HTML.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .harness import Backend, ConsulAgent, FerrymanProcess, async_wait_until, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHROMIUM_TIMEOUT = 60
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=5000",
]

# Two services on their own prefixes (the Consul agent is shared with the other test modules).
PAGE_ROUTE = "statuspage@*any*/statuspage"
API_ROUTE = "statusapi@*any*/statusapi"


def chromium_binary() -> str:
    path = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium")
    if not path or not Path(path).is_file():
        pytest.fail("no Chromium found (set CHROMIUM_BIN or put `chromium` on PATH): `make test` installs "
                    "Debian's chromium package, which this test drives headless")
    return path


def run_chromium(args: list[str], workdir: Path) -> str:
    """Run headless Chromium once with a fresh profile; its stdout. Killed (its own process group, by PID)
    when it takes longer than CHROMIUM_TIMEOUT."""
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
    env = {**os.environ, "HOME": str(profile)}  # nothing lands in the real home directory
    proc = subprocess.Popen(
        [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile / 'profile'}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium {args} took longer than {CHROMIUM_TIMEOUT}s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}"
    return out.decode()


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Row:
    attrs: dict[str, str]
    fields: dict[str, str] = field(default_factory=dict)


class StatusDom(HTMLParser):
    """What the rendered page shows: route rows, instance rows, service cards, the discovery fields, and the
    attributes and text of every element with an id."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.routes: list[Row] = []
        self.instances: list[Row] = []
        self.cards: dict[str, dict[str, str]] = {}
        self.discovery: dict[str, str] = {}
        self.ids: dict[str, dict[str, str]] = {}
        self.texts: dict[str, str] = {}
        self._stack: list[tuple[str, dict[str, str], Row | None]] = []

    def handle_starttag(self, tag: str, attr_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attr_list}
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs
            self.texts.setdefault(attrs["id"], "")
        if tag == "section" and "data-service" in attrs:
            self.cards[attrs["data-service"]] = attrs
        row = None
        if tag == "tr" and "data-route" in attrs:
            row = Row(attrs)
            self.routes.append(row)
        elif tag == "tr" and "data-instance" in attrs:
            row = Row(attrs)
            self.instances.append(row)
        if tag not in VOID:
            self._stack.append((tag, attrs, row))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, attrs, _ in self._stack:
            if "id" in attrs:
                self.texts[attrs["id"]] += data
        name = next((a["data-field"] for _, a, _ in reversed(self._stack) if "data-field" in a), None)
        if name is None:
            return
        row = next((r for _, _, r in reversed(self._stack) if r is not None), None)
        if row is not None:
            row.fields[name] = row.fields.get(name, "") + data
        elif any(a.get("id") == "discovery" for _, a, _ in self._stack):
            self.discovery[name] = self.discovery.get(name, "") + data

    def route(self, route_id: str) -> Row | None:
        return next((r for r in self.routes if r.attrs["data-route"] == route_id), None)

    def instance(self, instance_id: str) -> Row | None:
        return next((r for r in self.instances if r.attrs["data-instance"] == instance_id), None)


def dump_dom(ferryman: FerrymanProcess, workdir: Path) -> StatusDom:
    dom = StatusDom()
    dom.feed(run_chromium(["--dump-dom", f"{ferryman.admin_url}/"], workdir))
    dom.close()
    assert "routes" in dom.ids and "services" in dom.ids, "the page has no #routes table or #services container"
    body_loaded = dom.texts.get("updated", "")
    assert body_loaded.startswith("last updated"), f"the page never loaded /api/status: {body_loaded!r}"
    assert "hidden" in dom.ids["error"], f"error banner shown: {dom.texts.get('error')!r}"
    return dom


def status_document(ferryman: FerrymanProcess) -> dict[str, Any]:
    with urllib.request.urlopen(f"{ferryman.admin_url}/api/status", timeout=5) as resp:
        document: dict[str, Any] = json.loads(resp.read())
        return document


async def _start_services(consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
                          http: aiohttp.ClientSession) -> tuple[Backend, Backend, Backend]:
    page_a, page_b, api_a = [await Backend(n).start() for n in ("statuspage-a", "statuspage-b", "statusapi-a")]
    backends.extend([page_a, page_b, api_a])
    for backend in (page_a, page_b):
        await asyncio.to_thread(consul.register, "statuspage", backend.instance, backend.port,
                                ["urlprefix-/statuspage lb=round_robin"])
    await asyncio.to_thread(consul.register, "statusapi", api_a.instance, api_a.port,
                            ["urlprefix-/statusapi strip=/statusapi"])
    await asyncio.to_thread(ferryman.wait_instances, PAGE_ROUTE, ["statuspage-a", "statuspage-b"])
    await asyncio.to_thread(ferryman.wait_instances, API_ROUTE, ["statusapi-a"])
    for path in ("/statuspage/one", "/statuspage/two", "/statuspage/three", "/statusapi/users"):
        async with http.get(f"{ferryman.url}{path}") as resp:
            assert resp.status == 200, await resp.text()
            if path.startswith("/statusapi"):
                assert (await resp.json())["path"] == "/users"  # strip= took effect
    return page_a, page_b, api_a


async def _stop_services(consul: ConsulAgent) -> None:
    for instance in ("statuspage-a", "statuspage-b", "statusapi-a", "statusapi-dead"):
        await asyncio.to_thread(consul.deregister, instance)


class TestStatusPage:
    async def test_served_as_html_by_the_admin_listener(self, ferryman: FerrymanProcess) -> None:
        def get() -> tuple[str, str]:
            with urllib.request.urlopen(f"{ferryman.admin_url}/", timeout=5) as resp:
                return resp.headers.get("Content-Type", ""), resp.read().decode()

        content_type, body = await asyncio.to_thread(get)
        assert content_type.startswith("text/html")
        assert 'id="routes"' in body and "api/status" in body

    async def test_page_renders_live_routes_instances_and_discovery(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
        http: aiohttp.ClientSession, workdir: Path,
    ) -> None:
        try:
            page_a, page_b, api_a = await _start_services(consul, ferryman, backends, http)

            dom = await asyncio.to_thread(dump_dom, ferryman, workdir)

            # Header and discovery.
            assert dom.texts["ready"].strip() == "ready"
            assert dom.ids["discovery"].get("data-reachable") == "yes"
            assert dom.discovery["reachable"].strip() == "yes"
            assert dom.discovery["consul"].strip() == consul.addr

            # Routes: ours with the right columns, all of them in the API's match order.
            page_route, api_route = dom.route(PAGE_ROUTE), dom.route(API_ROUTE)
            assert page_route is not None and api_route is not None, [r.attrs for r in dom.routes]
            assert page_route.fields["path"] == "/statuspage"
            assert page_route.fields["service"] == "statuspage"
            assert page_route.fields["host"] == "*"
            assert api_route.fields["path"] == "/statusapi"
            assert api_route.fields["service"] == "statusapi"
            assert api_route.fields["strip"] == "/statusapi"
            # The shared agent also holds other tests' services, whose TTL checks may lapse between the page's
            # fetch and this one: compare the order of the routes both saw.
            api_order = [r["id"] for r in (await asyncio.to_thread(status_document, ferryman))["routes"]]
            dom_order = [r.attrs["data-route"] for r in dom.routes]
            assert [r for r in dom_order if r in api_order] == [r for r in api_order if r in dom_order]
            assert [r.fields["index"] for r in dom.routes] == [str(i) for i in range(1, len(dom_order) + 1)]

            # Services and their instances.
            assert dom.cards["statuspage"]["data-algorithm"] == "round_robin"
            assert dom.cards["statusapi"]["data-algorithm"] == "p2c"
            for backend, service in ((page_a, "statuspage"), (page_b, "statuspage"), (api_a, "statusapi")):
                row = dom.instance(backend.instance)
                assert row is not None, f"no row for {backend.instance}: {[r.attrs for r in dom.instances]}"
                assert row.attrs["data-service"] == service
                assert row.attrs["data-state"] == "healthy"
                assert row.fields["state"].strip() == "healthy"
                assert row.fields["address"] == f"127.0.0.1:{backend.port}"
                assert row.fields["in_flight"] == "0"

            # Change the world: one instance leaves Consul; the next render no longer lists it.
            await asyncio.to_thread(consul.deregister, "statuspage-b")
            await asyncio.to_thread(ferryman.wait_instances, PAGE_ROUTE, ["statuspage-a"])

            dom = await asyncio.to_thread(dump_dom, ferryman, workdir)

            assert dom.instance("statuspage-b") is None, status_document(ferryman)["services"]
            still = dom.instance("statuspage-a")
            assert still is not None and still.attrs["data-state"] == "healthy"
            assert dom.instance("statusapi-a") is not None
            assert dom.route(PAGE_ROUTE) is not None
        finally:
            await _stop_services(consul)

    async def test_ejected_instance_and_screenshot(
        self, consul: ConsulAgent, ferryman: FerrymanProcess, backends: list[Backend],
        http: aiohttp.ClientSession, workdir: Path, tmp_path: Path,
    ) -> None:
        """An instance nobody listens on gets ejected by passive health; the page shows it so, with its errors.
        Then a screenshot of the whole page for people to look at."""
        artifacts = os.environ.get("FERRYMAN_ARTIFACTS")
        out_dir = Path(artifacts) if artifacts else tmp_path
        out_dir.mkdir(parents=True, exist_ok=True)
        png = out_dir / "status-page.png"
        png.unlink(missing_ok=True)
        try:
            await _start_services(consul, ferryman, backends, http)
            await asyncio.to_thread(consul.register, "statusapi", "statusapi-dead", free_port(),
                                    ["urlprefix-/statusapi strip=/statusapi"])
            await asyncio.to_thread(ferryman.wait_instances, API_ROUTE, ["statusapi-a", "statusapi-dead"])

            async def dead_is_ejected() -> bool:
                async with http.get(f"{ferryman.url}/statusapi/users") as resp:
                    await resp.read()
                services = (await asyncio.to_thread(status_document, ferryman))["services"]
                return any(i["id"] == "statusapi-dead" and i["state"] == "ejected"
                           for s in services for i in s["instances"])

            await async_wait_until(dead_is_ejected, 10, "statusapi-dead to be ejected", interval=0.05)

            dom = await asyncio.to_thread(dump_dom, ferryman, workdir)
            dead = dom.instance("statusapi-dead")
            assert dead is not None and dead.attrs["data-state"] == "ejected", status_document(ferryman)
            assert dead.fields["state"].strip() == "ejected"
            assert int(dead.fields["errors_recent"]) > 0
            alive = dom.instance("statusapi-a")
            assert alive is not None and alive.attrs["data-state"] == "healthy"

            await asyncio.to_thread(
                run_chromium, [f"--screenshot={png}", "--window-size=1280,900", f"{ferryman.admin_url}/"], workdir
            )
        finally:
            await _stop_services(consul)

        assert png.is_file(), f"chromium wrote no screenshot to {png}"
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10 * 1024, f"screenshot {png} is only {len(data)} bytes"
        print(f"status page screenshot: {png}")
