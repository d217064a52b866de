"""Consul JSON in, Snapshot out: routes from catalog tags, endpoints from instances that pass every check."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from discovery.health import failing_checks, is_passing
from discovery.model import Endpoint, Problem, RouteOptions, RouteSpec, ServiceRoutes, ServiceSettings, Snapshot
from discovery.snapshot import build_service, build_snapshot
from discovery.triggers import routed

RECORDING = Path(__file__).resolve().parents[2] / "fixtures" / "consul_1_8_7.json"


def recorded() -> tuple[dict[str, list[str]], dict[str, list[dict[str, Any]]]]:
    """The recorded Consul 1.8.7 answers: (/v1/catalog/services, {service: /v1/health/service/<service>})."""
    data = json.loads(RECORDING.read_text(encoding="utf-8"))
    return data["catalog_services"], data["health"]


def check(check_id: str, status: str = "passing", service_id: str = "") -> dict[str, Any]:
    """One check as Consul reports it inside a health entry."""
    return {"CheckID": check_id, "Status": status, "ServiceID": service_id, "Name": check_id}


def entry(
    service: str,
    instance_id: str,
    *,
    port: Any = 8080,
    address: str = "10.0.0.5",
    node: str = "node-1",
    node_address: str = "10.0.0.1",
    checks: list[dict[str, Any]] | None = None,
    weights: Any = None,
) -> dict[str, Any]:
    """One /v1/health/service/<service> entry; by default serfHealth and the service check are passing."""
    svc: dict[str, Any] = {"ID": instance_id, "Service": service, "Address": address}
    if port is not None:
        svc["Port"] = port
    if weights is not None:
        svc["Weights"] = weights
    if checks is None:
        checks = [check("serfHealth"), check(f"service:{instance_id}", service_id=instance_id)]
    return {"Node": {"Node": node, "Address": node_address}, "Service": svc, "Checks": checks}


def endpoint(service: str, instance_id: str, **kw: Any) -> Endpoint:
    defaults: dict[str, Any] = {"address": "10.0.0.5", "port": 8080, "node": "node-1", "weight": 1}
    return Endpoint(service=service, instance_id=instance_id, **{**defaults, **kw})


class TestRecordedConsul187:
    """The recorded Consul 1.8.7 answers build the snapshot an operator of that cluster expects."""

    def test_whole_snapshot(self) -> None:
        catalog, health = recorded()
        assert build_snapshot(catalog, health) == Snapshot(
            services=(
                ServiceRoutes(
                    name="api",
                    routes=(RouteSpec("api.example.com", "/v1", RouteOptions(strip="/v1")),),
                    endpoints=(Endpoint("api", "api-1", "127.0.0.1", 18003, node="vm", weight=5),),
                ),
                ServiceRoutes(
                    name="web",
                    routes=(RouteSpec("", "/"), RouteSpec("", "/api", RouteOptions(strip="/api"))),
                    endpoints=(),
                ),
            )
        )

    def test_web_keeps_routes_with_no_healthy_instance(self) -> None:
        """Both web instances are out (one TTL critical, one in maintenance): routes stay, so 503 not 404."""
        web = build_snapshot(*recorded()).service("web")
        assert web is not None
        assert web.endpoints == ()
        assert [r.path for r in web.routes] == ["/", "/api"]

    def test_api_instance_without_address_uses_node_address(self) -> None:
        api = build_snapshot(*recorded()).service("api")
        assert api is not None
        (only,) = api.endpoints
        assert (only.address, only.port, only.weight) == ("127.0.0.1", 18003, 5)
        assert only.authority == "127.0.0.1:18003"

    def test_malformed_tag_is_a_problem_and_valid_route_still_applies(self) -> None:
        snapshot = build_snapshot(*recorded())
        assert [(p.kind, p.service, p.item) for p in snapshot.problems] == [
            ("route_tag_invalid", "api", "urlprefix-bad tag")
        ]
        assert "has no path" in snapshot.problems[0].detail
        api = snapshot.service("api")
        assert api is not None and api.routes == (RouteSpec("api.example.com", "/v1", RouteOptions(strip="/v1")),)

    @pytest.mark.parametrize("name", ["plain", "consul"], ids=["plain-tags-only", "consul-itself"])
    def test_services_without_route_tags_are_left_out(self, name: str) -> None:
        assert build_snapshot(*recorded()).service(name) is None

    def test_why_web_instances_are_out(self) -> None:
        _, health = recorded()
        assert {e["Service"]["ID"]: failing_checks(e) for e in health["web"]} == {
            "web-vm-18001": ["service:web-vm-18001"],
            "web-vm-18002": ["_service_maintenance:web-vm-18002"],
        }


HEALTH_CASES = [
    ([check("serfHealth"), check("service:a")], True, "all-passing"),
    ([], True, "no-checks-at-all"),
    ([check("serfHealth", "critical"), check("service:a")], False, "node-serf-health-critical"),
    ([check("serfHealth"), check("service:a", "warning")], False, "service-check-warning"),
    ([check("serfHealth"), check("service:a", "critical")], False, "service-check-critical"),
    ([check("serfHealth"), check("_node_maintenance", "critical")], False, "node-in-maintenance"),
    ([check("serfHealth"), check("_service_maintenance:a", "critical")], False, "service-in-maintenance"),
    ([check("serfHealth"), check("service:a", "maintenance")], False, "unknown-status"),
]


class TestHealthRule:
    """An instance receives traffic only when every check on it and on its node is passing."""

    @pytest.mark.parametrize(
        ("checks", "included"), [(c, i) for c, i, _ in HEALTH_CASES], ids=[i for *_, i in HEALTH_CASES]
    )
    def test_instance_in_or_out(self, checks: list[dict[str, Any]], included: bool) -> None:
        snapshot = build_snapshot({"a": ["urlprefix-/a"]}, {"a": [entry("a", "a-1", checks=checks)]})
        svc = snapshot.service("a")
        assert svc is not None
        assert svc.endpoints == ((endpoint("a", "a-1"),) if included else ())
        assert snapshot.problems == ()

    @pytest.mark.parametrize(
        ("health_entry", "failing"),
        [
            ({"Checks": [check("serfHealth"), check("service:a")]}, []),
            (
                {"Checks": [check("serfHealth", "critical"), check("service:a", "warning")]},
                ["serfHealth", "service:a"],
            ),
            ({"Checks": None}, []),
            ({}, []),
            ({"Checks": ["not-an-object"]}, ["<malformed check>"]),
            ({"Checks": [{"Status": "critical"}]}, ["<unnamed>"]),
        ],
        ids=["passing", "every-failing-check-named-in-order", "null-checks", "no-checks-key",
             "malformed-check", "check-without-id"],
    )
    def test_failing_checks(self, health_entry: dict[str, Any], failing: list[str]) -> None:
        assert failing_checks(health_entry) == failing
        assert is_passing(health_entry) is (not failing)


class TestEndpoints:
    """A passing instance becomes an Endpoint; one that cannot be reached is skipped as a Problem."""

    @pytest.mark.parametrize(
        ("health_entry", "expected"),
        [
            (entry("a", "a-1"), endpoint("a", "a-1")),
            (entry("a", "a-1", address=""), endpoint("a", "a-1", address="10.0.0.1")),
            (entry("a", "a-1", address="[::1]"), endpoint("a", "a-1", address="::1")),
            (entry("a", "a-1", weights={"Passing": 3, "Warning": 1}), endpoint("a", "a-1", weight=3)),
            (entry("a", "a-1", weights={"Passing": 0}), endpoint("a", "a-1", weight=1)),
            (entry("a", "a-1", weights={"Passing": True}), endpoint("a", "a-1", weight=1)),
        ],
        ids=["service-address", "empty-address-falls-back-to-node", "ipv6-brackets-removed",
             "weight-from-weights-passing", "zero-weight-means-default", "boolean-weight-ignored"],
    )
    def test_entry_to_endpoint(self, health_entry: dict[str, Any], expected: Endpoint) -> None:
        snapshot = build_snapshot({"a": ["urlprefix-/a"]}, {"a": [health_entry]})
        svc = snapshot.service("a")
        assert svc is not None and svc.endpoints == (expected,)

    def test_ipv6_endpoint_authority_has_brackets(self) -> None:
        assert endpoint("a", "a-1", address="::1", port=80).authority == "[::1]:80"

    @pytest.mark.parametrize(
        ("health_entry", "detail"),
        [
            (entry("a", "a-1", port=None), "port None is not a TCP port"),
            (entry("a", "a-1", port=0), "port 0 is not a TCP port"),
            (entry("a", "a-1", port=70000), "port 70000 is not a TCP port"),
            (entry("a", "a-1", port="8080"), "port '8080' is not a TCP port"),
            (entry("a", "a-1", address="", node_address=""), "no address"),
        ],
        ids=["missing-port", "port-zero", "port-too-large", "port-as-text", "no-address-anywhere"],
    )
    def test_unreachable_instance_is_a_problem(self, health_entry: dict[str, Any], detail: str) -> None:
        snapshot = build_snapshot(
            {"a": ["urlprefix-/a"]}, {"a": [health_entry, entry("a", "a-2", port=9090)]}
        )
        svc = snapshot.service("a")
        assert svc is not None and svc.endpoints == (endpoint("a", "a-2", port=9090),)
        (problem,) = snapshot.problems
        assert (problem.kind, problem.service, problem.item) == ("instance_invalid", "a", "a-1")
        assert detail in problem.detail

    def test_entry_that_is_not_an_object_is_a_problem(self) -> None:
        garbage: Any = "garbage"  # not an object, as a broken answer could hold
        snapshot = build_snapshot({"a": ["urlprefix-/a"]}, {"a": [garbage, entry("a", "a-1")]})
        svc = snapshot.service("a")
        assert svc is not None and svc.endpoints == (endpoint("a", "a-1"),)
        assert [p.kind for p in snapshot.problems] == ["instance_invalid"]

    def test_failing_instance_with_bad_port_is_not_reported(self) -> None:
        """An instance that is out anyway is not a problem worth logging."""
        bad = entry("a", "a-1", port=None, checks=[check("serfHealth", "critical")])
        assert build_snapshot({"a": ["urlprefix-/a"]}, {"a": [bad]}).problems == ()


class TestWhichServicesAreRouted:
    """Only services with at least one valid route tag and known health appear in the snapshot."""

    def test_service_without_health_yet_is_left_out(self) -> None:
        snapshot = build_snapshot(
            {"a": ["urlprefix-/a"], "b": ["urlprefix-/b"]}, {"a": [entry("a", "a-1")]}
        )
        assert [s.name for s in snapshot.services] == ["a"]

    def test_service_with_known_empty_health_is_kept(self) -> None:
        snapshot = build_snapshot({"a": ["urlprefix-/a"]}, {"a": []})
        assert snapshot.services == (ServiceRoutes("a", (RouteSpec("", "/a"),), ()),)

    def test_service_with_only_malformed_tags_is_left_out_and_reported(self) -> None:
        snapshot = build_snapshot({"a": ["urlprefix-nopath"]}, {"a": [entry("a", "a-1")]})
        assert snapshot.services == ()
        assert snapshot.problems == (
            Problem(
                "route_tag_invalid",
                "a",
                "route 'nopath' has no path: write nopath/ for every path of the host",
                "urlprefix-nopath",
            ),
        )

    def test_unknown_option_refuses_the_tag_and_names_the_option(self) -> None:
        snapshot = build_snapshot({"a": ["urlprefix-/a register=web", "urlprefix-/b"]}, {"a": [entry("a", "a-1")]})
        svc = snapshot.service("a")
        assert svc is not None and svc.routes == (RouteSpec("", "/b"),)
        assert [(p.kind, p.item) for p in snapshot.problems] == [("route_tag_invalid", "urlprefix-/a register=web")]
        assert "register=" in snapshot.problems[0].detail

    def test_blanks_around_a_tag_are_trimmed_as_fabio_does(self) -> None:
        svc = build_snapshot({"a": ["  urlprefix-/foo  "]}, {"a": [entry("a", "a-1")]}).service("a")
        assert svc is not None and svc.routes == (RouteSpec("", "/foo"),)

    def test_routes_are_deduplicated_and_sorted(self) -> None:
        tags = ["urlprefix-b.example.com/", "urlprefix-/z", "urlprefix-/a", "urlprefix-/a/", "urlprefix-/z"]
        svc = build_snapshot({"a": tags}, {"a": []}).service("a")
        assert svc is not None
        assert svc.routes == (RouteSpec("", "/a"), RouteSpec("", "/z"), RouteSpec("b.example.com", "/"))

    def test_same_route_with_options_in_another_order_is_one_route(self) -> None:
        tags = ["urlprefix-/a strip=/a proto=https", "urlprefix-/a proto=https strip=/a"]
        svc = build_snapshot({"a": tags}, {"a": []}).service("a")
        assert svc is not None and svc.routes == (RouteSpec("", "/a", RouteOptions(strip="/a", proto="https")),)

    def test_routes_on_one_path_sort_the_same_whatever_the_tag_order(self) -> None:
        tags = ["urlprefix-/a header=X-B", "urlprefix-/a priority=-3 method=GET", "urlprefix-/a", "urlprefix-/a lb=p2c"]
        one, other = (build_snapshot({"a": t}, {"a": []}).service("a") for t in (tags, tags[::-1]))
        assert one is not None and other is not None and one.routes == other.routes
        assert one.routes[0] == RouteSpec("", "/a")  # no option set sorts first

    def test_custom_tag_prefix(self) -> None:
        snapshot = build_snapshot({"a": ["route-/a", "urlprefix-/b"]}, {"a": []}, prefix="route-")
        svc = snapshot.service("a")
        assert svc is not None and svc.routes == (RouteSpec("", "/a"),)

    def test_routed_services_counts_malformed_route_tags(self) -> None:
        """The watcher follows every service with a route tag; whether it is valid is the builder's call."""
        catalog, _ = recorded()
        assert routed(catalog) == {"api", "web"}


class TestSnapshotEquality:
    """Equal Consul answers give equal snapshots, so the watcher can drop an unchanged one."""

    def test_equal_inputs_give_equal_snapshots(self) -> None:
        assert build_snapshot(*recorded()) == build_snapshot(*recorded())

    def test_instance_order_does_not_matter(self) -> None:
        entries = [entry("a", "a-1"), entry("a", "a-2", node="node-2"), entry("a", "a-3", port=9090)]
        forward = build_snapshot({"a": ["urlprefix-/a"]}, {"a": entries})
        backward = build_snapshot({"a": ["urlprefix-/a"]}, {"a": entries[::-1]})
        assert forward == backward
        svc = forward.service("a")
        assert svc is not None and len(svc.endpoints) == 3

    def test_tag_and_service_order_do_not_matter(self) -> None:
        one = build_snapshot(
            {"a": ["urlprefix-/a", "urlprefix-/b"], "b": ["urlprefix-/c"]}, {"a": [], "b": []}
        )
        other = build_snapshot(
            {"b": ["urlprefix-/c"], "a": ["urlprefix-/b", "urlprefix-/a"]}, {"b": [], "a": []}
        )
        assert one == other
        assert [s.name for s in one.services] == ["a", "b"]

    def test_changed_health_gives_a_different_snapshot(self) -> None:
        healthy = build_snapshot({"a": ["urlprefix-/a"]}, {"a": [entry("a", "a-1")]})
        failing = build_snapshot(
            {"a": ["urlprefix-/a"]}, {"a": [entry("a", "a-1", checks=[check("serfHealth", "critical")])]}
        )
        assert healthy != failing

    def test_problems_do_not_count_for_equality(self) -> None:
        """A malformed tag added next to valid ones changes no route, so nothing needs rebuilding."""
        clean = build_snapshot({"a": ["urlprefix-/a"]}, {"a": []})
        noisy = build_snapshot({"a": ["urlprefix-/a", "urlprefix-broken"]}, {"a": []})
        assert clean == noisy
        assert noisy.problems != ()


class TestServiceMeta:
    """Service meta sets balancing (ferryman-lb, -hash-key, -sticky) and weights (ferryman-weight)."""

    def test_meta_settings_and_weight(self) -> None:
        first = entry("api", "api-1")
        first["Service"]["Meta"] = {"ferryman-lb": "weighted", "ferryman-weight": "5"}
        second = entry("api", "api-2", port=8081)
        second["Service"]["Meta"] = {"ferryman-lb": "random", "ferryman-sticky": "srv"}
        snap = build_snapshot({"api": ["urlprefix-/api"]}, {"api": [second, first]})
        api = snap.service("api")
        assert api is not None
        assert api.settings == ServiceSettings(lb="weighted", sticky="srv")  # api-1 sorts first and wins lb
        assert {e.instance_id: e.weight for e in api.endpoints} == {"api-1": 5, "api-2": 1}
        assert snap.problems == ()

    def test_meta_timeouts(self) -> None:
        """ferryman-read-timeout and ferryman-connect-timeout are seconds, for long polls and slow networks."""
        item = entry("consul-ui", "ui-1")
        item["Service"]["Meta"] = {"ferryman-read-timeout": "360", "ferryman-connect-timeout": "1.5"}
        snap = build_snapshot({"consul-ui": ["urlprefix-/ui"]}, {"consul-ui": [item]})
        ui = snap.service("consul-ui")
        assert ui is not None and ui.settings == ServiceSettings(read_timeout=360.0, connect_timeout=1.5)

    @pytest.mark.parametrize(
        ("meta", "kind_detail"),
        [
            ({"ferryman-lb": "fastest"}, "lb='fastest' must be one of"),
            ({"ferryman-weight": "heavy"}, "ferryman-weight='heavy' must be a whole number"),
            ({"ferryman-sticky": "a b"}, "must be a cookie name"),
            ({"ferryman-read-timeout": "forever"}, "read_timeout='forever' must be a number of seconds"),
            ({"ferryman-connect-timeout": "0"}, "connect_timeout='0' must be a number of seconds"),
        ],
        ids=["bad-lb", "bad-weight", "bad-sticky", "bad-read-timeout", "bad-connect-timeout"],
    )
    def test_bad_meta_is_reported_and_ignored(self, meta: dict[str, str], kind_detail: str) -> None:
        item = entry("api", "api-1")
        item["Service"]["Meta"] = meta
        snap = build_snapshot({"api": ["urlprefix-/api"]}, {"api": [item]})
        api = snap.service("api")
        assert api is not None and api.settings == ServiceSettings() and [e.weight for e in api.endpoints] == [1]
        assert [p.kind for p in snap.problems] == ["service_meta_invalid"]
        assert kind_detail in snap.problems[0].detail


def tagged(health_entry: dict[str, Any], *tags: str, kind: str | None = None, **meta: str) -> dict[str, Any]:
    """`health_entry` with the instance's own tags (and Connect kind, service meta) set."""
    svc = {**health_entry["Service"], "Tags": list(tags)}
    if kind is not None:
        svc["Kind"] = kind
    if meta:
        svc["Meta"] = meta
    return {**health_entry, "Service": svc}


ROOT, BETA = RouteSpec("", "/"), RouteSpec("", "/beta")
DOWN = [check("serfHealth"), check("service:x", "critical", service_id="x")]


@dataclass
class ServiceCase:
    known: dict[str, list[Any]]  # datacenter -> health entries
    routes: tuple[RouteSpec, ...] | None  # None: the service is not built
    endpoints: list[str] = field(default_factory=list)  # Endpoint keys, in order
    members: dict[RouteSpec, set[str]] = field(default_factory=dict)
    datacenters: tuple[str, ...] = ("",)
    catalog_tags: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)


SERVICE_CASES = {
    "every-instance-declares-it": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/"), tagged(entry("web", "w-2", node="node-2"), "urlprefix-/")]},
        (ROOT,), ["node-1/w-1", "node-2/w-2"]),
    "a-route-one-instance-declares-is-its-alone": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/"),
              tagged(entry("web", "w-2", node="node-2"), "urlprefix-/", "urlprefix-/beta")]},
        (ROOT, BETA), ["node-1/w-1", "node-2/w-2"], {BETA: {"node-2/w-2"}}),
    "an-instance-without-route-tags-takes-no-traffic": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/"), tagged(entry("web", "w-2", node="node-2"), "v2")]},
        (ROOT,), ["node-1/w-1", "node-2/w-2"], {ROOT: {"node-1/w-1"}}),
    "a-route-only-a-failing-instance-declares-stays-with-no-member": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/"),
              tagged(entry("web", "w-2", checks=DOWN), "urlprefix-/", "urlprefix-/beta")]},
        (ROOT, BETA), ["node-1/w-1"], {BETA: set()}),
    "every-instance-failing-keeps-the-routes": ServiceCase(
        {"": [tagged(entry("web", "w-1", checks=DOWN), "urlprefix-/", "urlprefix-/beta")]}, (ROOT, BETA)),
    "a-route-from-meta-is-the-instances": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/"),
              tagged(entry("web", "w-2", node="node-2"), "urlprefix-/", **{"ferryman-route": "/beta"})]},
        (ROOT, BETA), ["node-1/w-1", "node-2/w-2"], {BETA: {"node-2/w-2"}}),
    "a-connect-proxy-is-not-an-instance": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/"),
              tagged(entry("web", "w-1-proxy", port=21000), "urlprefix-/", "urlprefix-/beta", kind="connect-proxy")]},
        (ROOT,), ["node-1/w-1"]),
    "gateways-are-not-instances": ServiceCase(
        {"": [tagged(entry("gw", f"gw-{kind}"), "urlprefix-/gw", kind=kind)
              for kind in ("mesh-gateway", "ingress-gateway", "terminating-gateway")]
              + [tagged(entry("gw", "gw-1", node="node-2"), "urlprefix-/")]},
        (ROOT,), ["node-2/gw-1"]),
    "a-sidecar-service-with-copied-tags-makes-no-route": ServiceCase(
        {"": [tagged(entry("web-sidecar-proxy", "w-1-proxy"), "urlprefix-/", kind="connect-proxy")]}, None,
        catalog_tags=("urlprefix-/",)),
    "entries-without-tags-fall-back-on-the-catalogs": ServiceCase(
        {"": [entry("web", "w-1"), entry("web", "w-2", node="node-2")]}, (ROOT, BETA),
        ["node-1/w-1", "node-2/w-2"], catalog_tags=("urlprefix-/", "urlprefix-/beta", "v2")),
    "entries-with-their-own-tags-ignore-the-catalogs": ServiceCase(
        {"": [tagged(entry("web", "w-1"), "urlprefix-/")]}, (ROOT,), ["node-1/w-1"],
        catalog_tags=("urlprefix-/", "urlprefix-/beta")),
    "an-empty-tag-list-is-the-instances-own": ServiceCase(
        {"": [tagged(entry("web", "w-1"))]}, None, catalog_tags=("urlprefix-/",)),
    "a-bad-tag-on-every-instance-is-reported-once": ServiceCase(
        {"": [tagged(entry("web", f"w-{n}", node=f"node-{n}"), "urlprefix-/", "urlprefix-bad tag") for n in (1, 2)]},
        (ROOT,), ["node-1/w-1", "node-2/w-2"], problems=["route_tag_invalid"]),
    "not-known-in-any-datacenter": ServiceCase({}, None),
    "known-in-another-datacenter-only": ServiceCase({"dc9": [tagged(entry("web", "w-1"), "urlprefix-/")]}, None),
    "dc-first-healthy-serves-with-dc-keys": ServiceCase(
        {"dc1": [tagged(entry("web", "w-1", checks=DOWN), "urlprefix-/")],
         "dc2": [tagged(entry("web", "w-9"), "urlprefix-/")]},
        (ROOT,), ["dc2/node-1/w-9"], datacenters=("dc1", "dc2")),
    "dc-routes-are-the-union-members-the-serving-ones": ServiceCase(
        {"dc1": [tagged(entry("web", "w-1"), "urlprefix-/")],
         "dc2": [tagged(entry("web", "w-9"), "urlprefix-/", "urlprefix-/beta")]},
        (ROOT, BETA), ["dc1/node-1/w-1"], {BETA: set()}, datacenters=("dc1", "dc2")),
    "dc-preferred-one-not-read-yet": ServiceCase(
        {"dc2": [tagged(entry("web", "w-9"), "urlprefix-/")]}, (ROOT,), ["dc2/node-1/w-9"],
        datacenters=("dc1", "dc2")),
}


class TestBuildService:
    """One service from its health entries: routes per instance (`members`), Connect kinds skipped, the
    catalog's tags only when no entry carries its own, failover across datacenters."""

    @pytest.mark.parametrize("case", SERVICE_CASES.values(), ids=SERVICE_CASES.keys())
    def test_build_service(self, case: ServiceCase) -> None:
        name = next((e["Service"]["Service"] for es in case.known.values() for e in es), "web")
        svc, problems = build_service(name, case.datacenters, case.known, catalog_tags=case.catalog_tags)
        assert [p.kind for p in problems] == case.problems
        if case.routes is None:
            assert svc is None
            return
        assert svc is not None
        assert (svc.name, svc.routes) == (name, case.routes)
        assert [e.key for e in svc.endpoints] == case.endpoints
        assert dict(svc.members) == {spec: frozenset(keys) for spec, keys in case.members.items()}
        for spec in svc.routes:
            assert svc.members_of(spec) == (frozenset(case.members[spec]) if spec in case.members else None)

    def test_a_service_named_by_another_source_is_built_without_routes(self) -> None:
        svc, _ = build_service("db", ("",), {"": [tagged(entry("db", "db-1"), "sql")]}, also=True)
        assert svc == ServiceRoutes("db", (), (endpoint("db", "db-1"),))

    def test_build_snapshot_is_build_service_per_service(self) -> None:
        """The whole-snapshot builder and the per-service one agree, so deltas and snapshots compare."""
        catalog, health = recorded()
        snapshot = build_snapshot(catalog, health)
        for svc in snapshot.services:
            built, _ = build_service(svc.name, ("",), {"": health[svc.name]}, catalog_tags=catalog[svc.name])
            assert built == svc


class TestVariablesInRoutes:
    """`$DC` in a route tag is the datacenter of the instance declaring it, as Consul reports its node's."""

    def test_dc_is_the_instances_datacenter(self) -> None:
        """An instance in dc1 declaring `urlprefix-$DC.example.com/` routes `dc1.example.com/`."""
        declared = entry("web", "web-1")
        declared["Node"]["Datacenter"] = "dc1"
        declared["Service"]["Tags"] = ["urlprefix-$DC.example.com/", "urlprefix-/${DC}/api"]
        svc, problems = build_service("web", ("",), {"": [declared]})
        assert problems == []
        assert svc is not None and {(r.host, r.path) for r in svc.routes} == {("dc1.example.com", "/"),
                                                                               ("", "/dc1/api")}

    def test_the_datacenter_read_from_when_the_node_does_not_say(self) -> None:
        """Read from a named datacenter, an entry without Node.Datacenter takes that name."""
        declared = entry("web", "web-1")
        declared["Service"]["Tags"] = ["urlprefix-/$DC"]
        svc, _ = build_service("web", ("dc2",), {"dc2": [declared]})
        assert svc is not None and [r.path for r in svc.routes] == ["/dc2"]

    def test_an_unknown_variable_is_a_route_tag_invalid(self) -> None:
        """`$NAME` Fabio does not expand refuses that tag, naming it; the service's other routes stay."""
        declared = entry("web", "web-1")
        declared["Node"]["Datacenter"] = "dc1"
        declared["Service"]["Tags"] = ["urlprefix-/$REGION/api", "urlprefix-/ok"]
        svc, problems = build_service("web", ("",), {"": [declared]})
        assert svc is not None and [r.path for r in svc.routes] == ["/ok"]
        assert [(p.kind, "$REGION" in p.detail) for p in problems] == [("route_tag_invalid", True)]

    def test_the_global_matcher_reaches_the_tags(self) -> None:
        """build_snapshot parses tags with the global path_matcher."""
        declared = entry("web", "web-1")
        declared["Service"]["Tags"] = ["urlprefix-/x/*"]
        snapshot = build_snapshot({"web": ["urlprefix-/x/*"]}, {"web": [declared]}, matcher="glob")
        assert [r.options.matcher for r in snapshot.services[0].routes] == ["glob"]
