"""Request conditions a route may add to host and path: method, header, cookie and query parameter.

From route tag options (no blanks inside a tag, so several conditions of one kind are `;`-separated):

    method=GET|HEAD                   one of these methods
    header=X-Canary                   the header is present
    header=X-Canary:1                 a value equals `1` (exact, case-sensitive)
    header=User-Agent~^curl/         a value matches the regular expression (re.search)
    cookie=beta  /  cookie=beta:1     the cookie is present / has this value
    query=v  /  query=v:2             the query parameter is present / has this value (after decoding)

All conditions of a route must hold. Pure: a request's method, header list and target in, a bool out. Parsing
raises ValueError saying what is wrong (the tag parser turns it into a TagError).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

_TOKEN: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
KINDS: Final = ("header", "cookie", "query")


@dataclass(frozen=True, slots=True)
class Condition:
    kind: str  # header, cookie or query
    name: str  # header names lower case
    op: str  # present, equals or regex
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def text(self) -> str:
        name = self.name
        if self.op == "present":
            return name
        return f"{name}{':' if self.op == 'equals' else '~'}{self.value}"


def parse_conditions(kind: str, text: str) -> tuple[Condition, ...]:
    """`X-A:1;X-B~^v;X-C` for `kind` -> conditions; ValueError for a bad one."""
    out = []
    for item in text.split(";"):
        if not item:
            raise ValueError(f"{kind}={text!r}: empty condition")
        cut = min((i for i in (item.find(":"), item.find("~")) if i >= 0), default=-1)
        if cut < 0:
            name, op, value = item, "present", ""
        else:
            name, op, value = item[:cut], "equals" if item[cut] == ":" else "regex", item[cut + 1:]
        if not _TOKEN.match(name):
            raise ValueError(f"{kind}={text!r}: {name!r} is not a {kind} name")
        pattern = None
        if op == "regex":
            if kind != "header":
                raise ValueError(f"{kind}={text!r}: regular expressions are for headers only")
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise ValueError(f"{kind}={text!r}: bad regular expression: {exc}") from exc
        out.append(Condition(kind, name.lower() if kind == "header" else name, op, value, pattern))
    return tuple(out)


def parse_methods(text: str) -> frozenset[str]:
    methods = frozenset(m.strip().upper() for m in text.split("|"))
    for method in methods:
        if not method or not _TOKEN.match(method):
            raise ValueError(f"method={text!r}: {method!r} is not a method")
    return methods


def header_values(headers: Sequence[tuple[bytes, bytes]], name: str) -> Iterator[str]:
    """The values of a header field (`name` lower case), in order."""
    wanted = name.encode("latin-1")
    return (value.decode("latin-1") for field, value in headers if field.lower() == wanted)


def cookie_values(headers: Sequence[tuple[bytes, bytes]], name: str) -> Iterator[str]:
    """The values of a cookie across the request's Cookie fields, in order."""
    for cookies in header_values(headers, "cookie"):
        for pair in cookies.split(";"):
            key, eq, value = pair.strip().partition("=")
            if eq and key == name:
                yield value


def holds(condition: Condition, headers: Sequence[tuple[bytes, bytes]], target: bytes) -> bool:
    if condition.kind == "query":
        _, _, query = target.decode("latin-1").partition("?")
        values = [v for k, v in parse_qsl(query, keep_blank_values=True) if k == condition.name]
    elif condition.kind == "cookie":
        values = list(cookie_values(headers, condition.name))
    else:
        values = list(header_values(headers, condition.name))
    if condition.op == "present":
        return bool(values)
    if condition.op == "equals":
        return condition.value in values
    assert condition.pattern is not None
    return any(condition.pattern.search(value) for value in values)
