"""Which instances may receive traffic, decided from one entry of Consul's /v1/health/service/<name>.

An entry carries the node, the service instance, and every check that applies to it: the node's own checks
(serfHealth, the `_node_maintenance` check while the node is in maintenance) and the instance's checks
(including `_service_maintenance:<id>`). An instance is in only when every one of them is `passing`, the
same rule as Consul's `?passing` filter, so `warning` is out too. Decided here rather than by `?passing` so
the reason an instance is out can be logged and tested.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

PASSING: Final = "passing"


def failing_checks(entry: Mapping[str, Any]) -> list[str]:
    """CheckIDs of the checks that keep this instance out (empty when it may receive traffic)."""
    out: list[str] = []
    checks = entry.get("Checks") or ()
    if not isinstance(checks, list | tuple):
        return ["<malformed checks>"]
    for check in checks:
        if not isinstance(check, Mapping):
            out.append("<malformed check>")
        elif check.get("Status") != PASSING:
            out.append(str(check.get("CheckID", "<unnamed>")))
    return out


def is_passing(entry: Mapping[str, Any]) -> bool:
    return not failing_checks(entry)
