"""Which services to read again, from the catalog and state/any answers: pure functions, table-driven."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pytest

from discovery.triggers import (
    Checks,
    StateAny,
    catalog_changes,
    changed_checks,
    health_changes,
    place_on_nodes,
    routed,
)


def svc_check(service: str, instance_id: str, status: str = "passing", *, node: str = "node-1",
              tags: Any = None, **extra: Any) -> dict[str, Any]:
    """One /v1/health/state/any item for an instance's own check."""
    return {"Node": node, "CheckID": f"service:{instance_id}", "Status": status, "ServiceID": instance_id,
            "ServiceName": service, "ServiceTags": ["urlprefix-/"] if tags is None else tags, **extra}


def node_check(node: str = "node-1", status: str = "passing", check_id: str = "serfHealth",
               **extra: Any) -> dict[str, Any]:
    """One /v1/health/state/any item for a node's own check (no service)."""
    return {"Node": node, "CheckID": check_id, "Status": status, "ServiceID": "", "ServiceName": "",
            "ServiceTags": [], **extra}


class TestChecksRead:
    """state/any is read into per-service and per-node signatures; what routing ignores is left out."""

    @pytest.mark.parametrize(
        ("checks", "services", "nodes"),
        [
            ([], {}, {}),
            ([svc_check("web", "web-1")],
             {"web": {("node-1", "web-1", "service:web-1", "passing", ("urlprefix-/",), 0)}}, {}),
            ([node_check()], {}, {"node-1": {("node-1", "", "serfHealth", "passing", (), 0)}}),
            ([{"Node": "node-2", "CheckID": "serfHealth", "Status": "critical"}], {},
             {"node-2": {("node-2", "", "serfHealth", "critical", (), 0)}}),
            (["garbage", None, 7, node_check()], {}, {"node-1": {("node-1", "", "serfHealth", "passing", (), 0)}}),
            ([svc_check("web", "web-1", ModifyIndex=12)],
             {"web": {("node-1", "web-1", "service:web-1", "passing", ("urlprefix-/",), 12)}}, {}),
            ([svc_check("web", "web-1", tags=None), svc_check("web", "web-2", tags="urlprefix-/")],
             {"web": {("node-1", "web-1", "service:web-1", "passing", ("urlprefix-/",), 0),
                      ("node-1", "web-2", "service:web-2", "passing", (), 0)}}, {}),
            ([svc_check("web", "web-1", tags=["urlprefix-/", 7, None])],
             {"web": {("node-1", "web-1", "service:web-1", "passing", ("urlprefix-/",), 0)}}, {}),
            ([svc_check("web", "web-1"), svc_check("api", "api-1", node="node-2"), node_check("node-2")],
             {"web": {("node-1", "web-1", "service:web-1", "passing", ("urlprefix-/",), 0)},
              "api": {("node-2", "api-1", "service:api-1", "passing", ("urlprefix-/",), 0)}},
             {"node-2": {("node-2", "", "serfHealth", "passing", (), 0)}}),
        ],
        ids=["empty", "service-check", "node-check", "no-service-name-is-the-nodes", "non-objects-skipped",
             "modify-index-kept", "tags-not-a-list-are-none", "non-text-tags-dropped", "several-services-and-nodes"],
    )
    def test_read(self, checks: list[Any], services: dict[str, set[Any]], nodes: dict[str, set[Any]]) -> None:
        read = Checks.read(checks)
        assert read.services == {k: frozenset(v) for k, v in services.items()}
        assert read.nodes == {k: frozenset(v) for k, v in nodes.items()}

    @pytest.mark.parametrize(
        ("one", "other", "equal"),
        [
            (svc_check("web", "web-1", Output="ok", ModifyIndex=10),
             svc_check("web", "web-1", Output="still ok", ModifyIndex=10), True),
            (node_check(Output="Agent alive", Notes="n", ModifyIndex=3), node_check(Output="alive", ModifyIndex=3),
             True),
            (svc_check("web", "web-1", ModifyIndex=10), svc_check("web", "web-1", ModifyIndex=11), False),
            (node_check(ModifyIndex=3), node_check(ModifyIndex=4), False),
            (svc_check("web", "web-1", ModifyIndex="10"), svc_check("web", "web-1"), True),
            (svc_check("web", "web-1", ModifyIndex=True), svc_check("web", "web-1", ModifyIndex=0), True),
        ],
        ids=["output-alone-does-not-count", "node-output-alone-does-not-count", "a-rewritten-service-check-counts",
             "a-rewritten-node-check-counts", "an-index-not-a-number-is-zero", "a-boolean-index-is-zero"],
    )
    def test_what_counts(self, one: dict[str, Any], other: dict[str, Any], equal: bool) -> None:
        """Status, tags and the check's ModifyIndex count (a re-registration rewrites its checks); the output
        and notes alone do not."""
        assert (Checks.read([one]) == Checks.read([other])) is equal


ON_NODE = {"node-1": {"web", "api"}, "node-2": {"web"}}
BASE = [node_check("node-1"), node_check("node-2"), svc_check("web", "web-1"), svc_check("web", "web-2", node="node-2"),
        svc_check("api", "api-1")]


def without(checks: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [c for c in checks if any(c.get(k) != v for k, v in match.items())]


class TestHealthChanges:
    """The services whose checks changed, and the services known on a node whose own checks changed."""

    @pytest.mark.parametrize(
        ("after", "on_node", "expected"),
        [
            (BASE, ON_NODE, set()),
            ([*BASE[:2], svc_check("web", "web-1", "critical"), *BASE[3:]], ON_NODE, {"web"}),
            ([*BASE[:4], svc_check("api", "api-1", "warning")], ON_NODE, {"api"}),
            ([*BASE, svc_check("shop", "shop-1")], ON_NODE, {"shop"}),
            (without(BASE, ServiceID="api-1"), ON_NODE, {"api"}),
            ([*BASE[:3], svc_check("web", "web-2", node="node-2", tags=["urlprefix-/", "urlprefix-/v2"]), BASE[4]],
             ON_NODE, {"web"}),
            ([node_check("node-1"), node_check("node-2", "critical"), *BASE[2:]], ON_NODE, {"web"}),
            ([node_check("node-1", "critical"), *BASE[1:]], ON_NODE, {"web", "api"}),
            ([*BASE, node_check("node-1", "critical", "_node_maintenance")], ON_NODE, {"web", "api"}),
            ([node_check("node-1"), *BASE[2:]], ON_NODE, {"web"}),
            ([*BASE, node_check("node-3", "critical")], ON_NODE, set()),
            ([*BASE[:2], svc_check("web", "web-1", ModifyIndex=90), *BASE[3:]], ON_NODE, {"web"}),
            ([node_check("node-1"), node_check("node-2", "critical"), *BASE[2:4],
              svc_check("api", "api-1", "critical")], ON_NODE, {"web", "api"}),
            ([node_check("node-1", "critical"), *BASE[1:]], {}, set()),
        ],
        ids=["unchanged", "service-check-critical", "service-check-warning", "new-service", "service-gone",
             "instance-tags-changed", "node-check-names-services-on-it", "node-with-two-services",
             "node-maintenance-added", "node-check-gone", "unknown-node", "check-rewritten",
             "node-and-service-together", "nothing-known-on-the-node"],
    )
    def test_changed(self, after: list[dict[str, Any]], on_node: Mapping[str, set[str]], expected: set[str]) -> None:
        assert health_changes(Checks.read(BASE), Checks.read(after), on_node) == expected

    def test_from_nothing_every_service_with_checks_changed(self) -> None:
        assert health_changes(Checks(), Checks.read(BASE), {}) == {"web", "api"}


def entry(node: str) -> dict[str, Any]:
    """One /v1/health/service entry, as far as its node goes."""
    return {"Node": {"Node": node}, "Service": {"ID": f"x-{node}"}, "Checks": []}


class TestPlaceOnNodes:
    """Which services run on each node follows every read: a service leaves the nodes it moved off, and a node
    no service runs on any more is forgotten (the map never only grows)."""

    @pytest.mark.parametrize(
        ("on_node", "before", "after", "expected"),
        [
            pytest.param({}, [], ["a", "b"], {"a": {"web"}, "b": {"web"}}, id="first-read"),
            pytest.param({"a": {"web"}}, ["a"], ["b"], {"b": {"web"}}, id="moved-to-another-node"),
            pytest.param({"a": {"web", "api"}}, ["a"], ["b"], {"a": {"api"}, "b": {"web"}},
                         id="moved-off-a-shared-node"),
            pytest.param({"a": {"web"}, "b": {"web"}}, ["a", "b"], [], {}, id="gone"),
            pytest.param({"a": {"web"}}, ["a"], ["a", "a"], {"a": {"web"}}, id="two-instances-on-one-node"),
        ],
    )
    def test_place(self, on_node: dict[str, set[str]], before: list[str], after: list[str],
                   expected: dict[str, set[str]]) -> None:
        place_on_nodes(on_node, "web", [entry(n) for n in before], [entry(n) for n in after])
        assert on_node == expected

    def test_a_node_check_then_names_only_the_services_still_there(self) -> None:
        """After web moved from node-1 to node-2, node-1's serfHealth failing names nothing to read."""
        on_node: dict[str, set[str]] = {}
        place_on_nodes(on_node, "web", [], [entry("node-1")])
        place_on_nodes(on_node, "web", [entry("node-1")], [entry("node-2")])
        before = Checks.read([node_check("node-1")])
        after = Checks.read([node_check("node-1", status="critical")])
        assert health_changes(before, after, on_node) == set()


class TestRouted:
    """A service is followed when one of its tags is a route tag (valid or not) or another source names it."""

    @pytest.mark.parametrize(
        ("catalog", "prefix", "also", "expected"),
        [
            ({"web": ["urlprefix-/"], "plain": ["metrics"], "bare": []}, "urlprefix-", (), {"web"}),
            ({"api": ["urlprefix-bad tag"]}, "urlprefix-", (), {"api"}),
            ({"web": ["urlprefix-"]}, "urlprefix-", (), {"web"}),
            ({"web": ["route-/", "urlprefix-/b"], "api": ["urlprefix-/api"]}, "route-", (), {"web"}),
            ({"web": ["urlprefix-/"], "db": ["sql"]}, "urlprefix-", {"db"}, {"web", "db"}),
            ({"web": ["urlprefix-/"]}, "urlprefix-", {"gone"}, {"web"}),
            ({"web": None, "api": "urlprefix-/api", "odd": [7, "urlprefix-/odd"]}, "urlprefix-", (), {"odd"}),
            ({}, "urlprefix-", {"db"}, set()),
        ],
        ids=["route-tag-only", "malformed-counts", "bare-prefix-counts", "custom-prefix",
             "also-in-the-catalog", "also-not-in-the-catalog", "tags-not-a-list-ignored", "empty-catalog"],
    )
    def test_routed(self, catalog: dict[str, Any], prefix: str, also: Any, expected: set[str]) -> None:
        assert routed(catalog, prefix, also) == expected


class TestCatalogChanges:
    """A catalog answer names the routed services to read (new, or tags changed) and those to forget."""

    @pytest.mark.parametrize(
        ("before", "after", "expected"),
        [
            ({}, {"web": ["urlprefix-/"], "api": ["urlprefix-/api"]}, ({"web", "api"}, set())),
            ({"web": ["urlprefix-/"]}, {"web": ["urlprefix-/"]}, (set(), set())),
            ({"web": ["urlprefix-/"], "api": ["urlprefix-/api"]}, {"web": ["urlprefix-/", "v2"],
                                                                    "api": ["urlprefix-/api"]}, ({"web"}, set())),
            ({"web": ["urlprefix-/"]}, {"web": ["urlprefix-/"], "shop": ["urlprefix-/shop"]}, ({"shop"}, set())),
            ({"web": ["urlprefix-/"], "api": ["urlprefix-/api"]}, {"web": ["urlprefix-/"]}, (set(), {"api"})),
            ({"web": ["urlprefix-/"], "api": ["urlprefix-/api"]}, {"web": ["urlprefix-/"], "api": ["v1"]},
             (set(), {"api"})),
            ({"web": ["urlprefix-/"], "plain": ["metrics"]}, {"web": ["urlprefix-/"], "plain": ["metrics"]},
             (set(), {"plain"})),
            ({"plain": ["metrics"]}, {"plain": ["urlprefix-/plain"]}, ({"plain"}, set())),
        ],
        ids=["first-answer-reads-every-routed", "unchanged", "tags-changed", "new-service", "service-gone",
             "route-tag-gone", "every-unwanted-name-of-before-is-returned", "becomes-routed"],
    )
    def test_changes(self, before: dict[str, list[str]], after: dict[str, list[str]],
                     expected: tuple[set[str], set[str]]) -> None:
        assert catalog_changes(before, after, routed(after)) == expected


def as_consul_writes(checks: list[dict[str, Any]], layout: str) -> bytes:
    """state/any's body as Consul's encoder writes it: compact, or indented (a dev agent, ?pretty), newline-ended."""
    return (json.dumps(checks, separators=(",", ":")) if layout == "compact" else json.dumps(checks, indent=4)
            ).encode() + b"\n"


WEB = [node_check(ModifyIndex=5), svc_check("web", "web-1", ModifyIndex=7),
       svc_check("api", "api-1", ModifyIndex=8, Output='he said "},{"Node":" twice')]


class TestChangedChecks:
    """Two state/any answers compared on their raw text: only the checks that differ are decoded, and they name
    the services and nodes whose checks changed, and the indexes the new ones were written at."""

    @pytest.mark.parametrize("layout", ["compact", "indented"])
    @pytest.mark.parametrize(
        ("after", "services", "nodes", "written"),
        [
            (WEB, set(), set(), set()),
            ([*WEB[:2], svc_check("api", "api-1", "critical", ModifyIndex=9)], {"api"}, set(), {9}),
            (WEB[:2], {"api"}, set(), set()),
            ([*WEB, svc_check("db", "db-1", ModifyIndex=10)], {"db"}, set(), {10}),
            ([node_check(status="critical", ModifyIndex=11), *WEB[1:]], set(), {"node-1"}, {11}),
            ([], {"web", "api"}, {"node-1"}, set()),
        ],
        ids=["unchanged", "status-changed", "check-removed", "check-added", "node-check-changed", "all-gone"],
    )
    def test_names_what_changed(self, layout: str, after: list[dict[str, Any]], services: set[str],
                                nodes: set[str], written: set[int]) -> None:
        """The differing checks name their services (or their nodes) and the indexes they were written at."""
        changes = changed_checks(StateAny(as_consul_writes(WEB, layout)), StateAny(as_consul_writes(after, layout)))
        assert changes is not None
        assert (set(changes.services), set(changes.nodes), set(changes.written)) == (services, nodes, written)

    @pytest.mark.parametrize("body", [b'[ {"Node": "n"} ]', b'{"not": "a list"}', b"[1, 2]"],
                             ids=["other-spacing", "object", "numbers"])
    def test_an_unknown_layout_is_left_to_a_whole_decode(self, body: bytes) -> None:
        """A body this does not know how to split gives None, and the caller decodes both answers whole."""
        assert changed_checks(StateAny(as_consul_writes(WEB, "compact")), StateAny(body)) is None

    def test_reads_as_the_list_of_checks(self) -> None:
        """A StateAny is the decoded list when read as one, whichever the layout."""
        for layout in ("compact", "indented"):
            assert list(StateAny(as_consul_writes(WEB, layout))) == WEB
        assert len(StateAny(b"[]\n")) == 0 and StateAny(b"[]\n").parts() == []
