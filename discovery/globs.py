"""Fabio's glob path matcher: the pattern syntax of gobwas/glob, compiled as Fabio compiles it (no separators).

Fabio compiles every route path with `glob.Compile(path)` and no separator characters, so:
  `*`  any run of characters, `/` included (`/foo/*/bar` matches `/foo/x/y/bar`); `**` the same
  `?`  exactly one character, `/` included
  `[abc]` `[!abc]` one character of / not of the list; `[a-z]` `[!a-z]` one in / out of the range (a range is
       one `lo-hi` pair and nothing else: `[a-cx]` does not compile)
  `{a,b}` one of the alternatives (each a pattern itself); an alternative group left open at the end of the
       pattern is closed there, as gobwas does
  `\\x` the character x itself; `]`, `}` and `,` outside a group are plain characters
and the pattern must match the whole path. Fabio's documentation points to Go's `path.Match`, whose `*` stops
at `/`; its code does not, and this module follows the code (what Fabio users' routes actually do).

The pattern is read as gobwas's lexer reads it and turned into a Python regular expression, compiled once per
pattern text (routes are rebuilt on every table swap; the same few patterns come back). Pure: text in, a
compiled pattern out, or GlobError saying what is wrong.
"""

from __future__ import annotations

import functools
import re
from typing import Final

_TEXT_BREAKERS: Final = frozenset("*?[{")
_GROUP_BREAKERS: Final = _TEXT_BREAKERS | frozenset("},")


class GlobError(ValueError):
    """A pattern gobwas/glob does not compile; the message says why."""


@functools.lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """The compiled form of a Fabio glob route path; match with `.fullmatch(path)`."""
    return re.compile(_Reader(pattern).regex(), re.DOTALL)


class _Reader:
    """gobwas's lexer and parser in one pass: each token becomes its piece of the regular expression."""

    def __init__(self, pattern: str) -> None:
        self.text, self.pos, self.depth = pattern, 0, 0

    def regex(self) -> str:
        out: list[str] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            self.pos += 1
            if c == "{":
                self.depth += 1
                out.append("(?:")
            elif c == "," and self.depth:
                out.append("|")
            elif c == "}" and self.depth:
                self.depth -= 1
                out.append(")")
            elif c == "[":
                out.append(self._range())
            elif c == "?":
                out.append(".")
            elif c == "*":
                if self.text[self.pos : self.pos + 1] == "*":
                    self.pos += 1  # `**`: gobwas's super-asterisk; without separators the same as `*`
                out.append(".*")
            else:
                self.pos -= 1
                out.append(re.escape(self._literal(_GROUP_BREAKERS if self.depth else _TEXT_BREAKERS)))
        out.append(")" * self.depth)  # gobwas closes a group left open at the end
        return "".join(out)

    def _literal(self, breakers: frozenset[str]) -> str:
        """Characters up to the next breaker; `\\` takes the next character as it is (a lone one at the end is
        dropped, as gobwas drops it)."""
        chars: list[str] = []
        escaped = False
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if not escaped and c == "\\":
                escaped = True
                self.pos += 1
                continue
            if not escaped and c in breakers:
                break
            escaped = False
            chars.append(c)
            self.pos += 1
        return "".join(chars)

    def _range(self) -> str:
        """After `[`: `!` (negation), then either `lo-hi` or a list of characters, then `]`."""
        negate = False
        if self.text[self.pos : self.pos + 1] == "!":
            negate, self.pos = True, self.pos + 1
        if self.pos >= len(self.text):
            raise GlobError(f"{self.text!r}: '[' is not closed")
        if self.text[self.pos + 1 : self.pos + 2] == "-":
            if self.pos + 2 >= len(self.text):
                raise GlobError(f"{self.text!r}: a range [lo-hi] is not closed")
            lo, hi = self.text[self.pos], self.text[self.pos + 2]
            self.pos += 3
            if hi < lo:
                raise GlobError(f"{self.text!r}: in [{lo}-{hi}] the range runs backwards")
            body = f"{re.escape(lo)}-{re.escape(hi)}"
        else:
            chars = self._literal(frozenset("]"))
            if not chars:
                raise GlobError(f"{self.text!r}: an empty character list []")
            body = "".join(re.escape(c) for c in chars)
        if self.text[self.pos : self.pos + 1] != "]":
            raise GlobError(f"{self.text!r}: a character range or list must end with ']' "
                            "(a range is one lo-hi pair)")
        self.pos += 1
        return f"[{'^' if negate else ''}{body}]"
