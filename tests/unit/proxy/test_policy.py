"""A service's policy, resolved setting by setting: config file > service meta > route tags > default."""

from __future__ import annotations

from typing import Any

import pytest

from discovery.model import ServiceRoutes, ServiceSettings
from discovery.tags import parse_route_tag
from proxy.policy import ServiceDefaults, ServicePolicy, service_policy

DEFAULTS = ServiceDefaults(max_concurrent=50)
NONE = ServiceSettings()


def policy(override: ServiceSettings | None, meta: ServiceSettings, tags: tuple[str, ...]) -> ServicePolicy:
    routes = tuple(parse_route_tag("urlprefix-" + tag) for tag in tags)
    return service_policy(ServiceRoutes("api", routes, (), settings=meta), override, DEFAULTS)


CASES: list[tuple[str, ServiceSettings | None, ServiceSettings, tuple[str, ...], str, Any]] = [
    # (id, config file, service meta, route tags, field, expected)
    ("algorithm-default", None, NONE, ("/",), "algorithm", "p2c"),
    ("algorithm-from-tag", None, NONE, ("/ lb=least_conn",), "algorithm", "least_conn"),
    ("algorithm-meta-over-tag", None, ServiceSettings(lb="random"), ("/ lb=least_conn",), "algorithm", "random"),
    ("algorithm-config-over-meta", ServiceSettings(lb="round_robin"), ServiceSettings(lb="random"),
     ("/ lb=least_conn",), "algorithm", "round_robin"),
    ("algorithm-first-route-in-order-that-has-it", None, NONE, ("/a", "/b lb=random", "/c lb=least_conn"),
     "algorithm", "random"),
    ("hash-on-client-address-by-default", None, NONE, ("/ lb=hash",), "hash_on", ("ip", "")),
    ("hash-on-from-tag", None, NONE, ("/ lb=hash hash_key=header:X-User",), "hash_on", ("header", "x-user")),
    ("hash-on-meta-over-tag", None, ServiceSettings(hash_on=("cookie", "sid")),
     ("/ lb=hash hash_key=header:X-User",), "hash_on", ("cookie", "sid")),
    ("hash-on-config-over-meta", ServiceSettings(hash_on=("ip", "")), ServiceSettings(hash_on=("cookie", "sid")),
     ("/ lb=hash",), "hash_on", ("ip", "")),
    ("hash-on-from-another-route-than-lb", ServiceSettings(lb="hash"), NONE, ("/a", "/b hash_key=cookie:sid"),
     "hash_on", ("cookie", "sid")),
    ("no-hash-on-without-hash", None, NONE, ("/ hash_key=cookie:sid",), "hash_on", None),
    ("no-sticky-by-default", None, NONE, ("/",), "sticky", None),
    ("sticky-from-tag", None, NONE, ("/ sticky=t",), "sticky", "t"),
    ("sticky-meta-over-tag", None, ServiceSettings(sticky="m"), ("/ sticky=t",), "sticky", "m"),
    ("sticky-config-over-meta", ServiceSettings(sticky="c"), ServiceSettings(sticky="m"), ("/ sticky=t",),
     "sticky", "c"),
    ("no-health-path-by-default", None, NONE, ("/",), "health_path", None),
    ("health-path-from-meta", None, ServiceSettings(health_path="/m"), ("/",), "health_path", "/m"),
    ("health-path-config-over-meta", ServiceSettings(health_path="/c"), ServiceSettings(health_path="/m"), ("/",),
     "health_path", "/c"),
    ("max-concurrent-global-by-default", None, NONE, ("/",), "max_concurrent", 50),
    ("max-concurrent-from-config", ServiceSettings(max_concurrent=5), NONE, ("/",), "max_concurrent", 5),
    ("max-concurrent-zero-in-config-is-no-limit", ServiceSettings(max_concurrent=0), NONE, ("/",),
     "max_concurrent", 0),
    ("max-body-zero-means-the-global-one", None, NONE, ("/ maxbody=1k",), "max_body", 0),
    ("max-body-from-config", ServiceSettings(max_body=1024**2), NONE, ("/",), "max_body", 1024**2),
    ("read-timeout-global-by-default", None, NONE, ("/",), "read_timeout", 0.0),
    ("read-timeout-from-tag", None, NONE, ("/ read_timeout=60",), "read_timeout", 60.0),
    ("read-timeout-meta-over-tag", None, ServiceSettings(read_timeout=360), ("/ read_timeout=60",),
     "read_timeout", 360.0),
    ("read-timeout-config-over-meta", ServiceSettings(read_timeout=10), ServiceSettings(read_timeout=360),
     ("/ read_timeout=60",), "read_timeout", 10.0),
    ("connect-timeout-global-by-default", None, NONE, ("/",), "connect_timeout", 0.0),
    ("connect-timeout-from-tag", None, NONE, ("/ connect_timeout=0.5",), "connect_timeout", 0.5),
    ("connect-timeout-meta-over-tag", None, ServiceSettings(connect_timeout=2), ("/ connect_timeout=0.5",),
     "connect_timeout", 2.0),
    ("connect-timeout-config-over-meta", ServiceSettings(connect_timeout=1), ServiceSettings(connect_timeout=2),
     ("/",), "connect_timeout", 1.0),
    ("checks-over-http-by-default", None, NONE, (), "check_scheme", "http"),
    ("checks-as-the-first-route-reaches-instances", None, NONE, ("/a proto=https", "/b"), "check_scheme", "https"),
    ("checks-verify-by-default", None, NONE, ("/ proto=https",), "check_skip_verify", False),
    ("checks-skip-verify-as-the-first-route", None, NONE, ("/ proto=https tlsskipverify=true",),
     "check_skip_verify", True),
]


class TestPrecedence:
    """Each setting comes from the first source that sets it: config file, service meta, route tags, default."""

    @pytest.mark.parametrize(("override", "meta", "tags", "field", "expected"), [c[1:] for c in CASES],
                             ids=[c[0] for c in CASES])
    def test_setting(self, override: ServiceSettings | None, meta: ServiceSettings, tags: tuple[str, ...],
                     field: str, expected: Any) -> None:
        assert getattr(policy(override, meta, tags), field) == expected

    def test_whole_policy_of_a_plain_service(self) -> None:
        assert policy(None, NONE, ("/",)) == ServicePolicy(max_concurrent=50)


class TestServiceSettings:
    """Settings of one source fall back, field by field, to another's."""

    def test_over_keeps_what_is_set_and_fills_the_rest(self) -> None:
        mine = ServiceSettings(lb="hash", max_concurrent=0)
        theirs = ServiceSettings(lb="random", sticky="s", max_concurrent=9)
        assert mine.over(theirs) == ServiceSettings(lb="hash", sticky="s", max_concurrent=0)
