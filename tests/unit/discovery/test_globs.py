"""Fabio's glob matcher: route paths in gobwas/glob syntax, compiled without separators, matching whole paths."""

from __future__ import annotations

import pytest

from discovery.globs import GlobError, compile_glob

# Fabio's route/matcher_test.go TestGlobMatcher, case for case: (request path, route path, matches).
FABIO_GLOB_TABLE = [
    ("/foo", "/foo", True),
    ("/fool", "/foo?", True),
    ("/fool", "/foo*", True),
    ("/fools", "/foo*", True),
    ("/foo/x/bar", "/foo/*/bar", True),
    ("/foo/x/y/z/w/bar", "/foo/**", True),
    ("/foo/x/y/z/w/bar", "/foo/**/bar", True),
    ("/fo", "/foo", False),
    ("/fools", "/foo", False),
    ("/fo", "/foo*", False),
    ("/fools", "/foo.*", False),
    ("/foo/x/y/z/w/baz", "/foo/**/bar", False),
]

# The rest of gobwas's syntax as Fabio compiles it (no separators given, so `*` and `?` cross '/').
SYNTAX = [
    ("/foo/x/y/bar", "/foo/*/bar", True, "star-crosses-slash"),
    ("/foo/bar", "/foo/*/bar", False, "star-needs-its-slashes"),
    ("/foo//bar", "/foo/*/bar", True, "star-matches-empty"),
    ("/a/b", "/a?b", True, "question-mark-matches-slash"),
    ("/ab", "/a?b", False, "question-mark-is-one-character"),
    ("/img/b.png", "/img/[abc].png", True, "list"),
    ("/img/d.png", "/img/[abc].png", False, "list-miss"),
    ("/img/d.png", "/img/[!abc].png", True, "negated-list"),
    ("/v3", "/v[1-3]", True, "range"),
    ("/v4", "/v[1-3]", False, "range-miss"),
    ("/v4", "/v[!1-3]", True, "negated-range"),
    ("/api/v2/x", "/api/{v1,v2}/*", True, "alternatives"),
    ("/api/v3/x", "/api/{v1,v2}/*", False, "alternatives-miss"),
    ("/static/app.css", "/static/*.{css,js}", True, "alternatives-after-star"),
    ("/x/b", "/x/{a,b", True, "open-group-closed-at-the-end"),
    ("/a*b", "/a\\*b", True, "escaped-star-is-literal"),
    ("/axb", "/a\\*b", False, "escaped-star-matches-only-itself"),
    ("/a]b", "/a]b", True, "close-bracket-outside-a-range-is-literal"),
    ("/a,b}", "/a,b}", True, "comma-and-brace-outside-a-group-are-literal"),
    ("/a.b", "/a.b", True, "dot-is-literal"),
    ("/aXb", "/a.b", False, "dot-is-not-any-character"),
    ("/Foo", "/foo", False, "case-sensitive"),
    ("/foo/", "/foo/", True, "trailing-slash-kept"),
    ("/foo", "/foo/", False, "trailing-slash-required"),
]


@pytest.mark.parametrize("path, pattern, matches", FABIO_GLOB_TABLE,
                         ids=[f"{p}~{q}" for p, q, _ in FABIO_GLOB_TABLE])
def test_fabio_glob_table(path: str, pattern: str, matches: bool) -> None:
    """Each row of Fabio's glob matcher table answers as in Fabio."""
    assert (compile_glob(pattern).fullmatch(path) is not None) is matches


@pytest.mark.parametrize("path, pattern, matches, case_id", SYNTAX, ids=[c[3] for c in SYNTAX])
def test_gobwas_syntax(path: str, pattern: str, matches: bool, case_id: str) -> None:
    """gobwas/glob's syntax, as a Fabio route path compiled without separators."""
    assert (compile_glob(pattern).fullmatch(path) is not None) is matches


@pytest.mark.parametrize("pattern", ["/a[", "/a[]", "/a[!]", "/a[b-", "/a[z-a]", "/a[a-cx]", "/a[a-]"],
                         ids=["open", "empty", "empty-negated", "open-range", "backwards-range",
                              "range-then-list", "range-without-high"])
def test_patterns_gobwas_refuses_do_not_compile(pattern: str) -> None:
    """A pattern gobwas/glob refuses to compile raises GlobError, so the route is refused, not misrouted."""
    with pytest.raises(GlobError):
        compile_glob(pattern)
