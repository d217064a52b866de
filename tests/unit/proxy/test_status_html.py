"""The status page is one self-contained file: no external resources, and data never parsed as HTML."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

PAGE = Path(__file__).resolve().parents[3] / "proxy" / "static" / "status.html"


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.ids: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href", "action", "srcset", "poster", "data"} and value is not None:
                self.refs.append((tag, name, value))
            if name == "id" and value:
                self.ids.append(value)


def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_no_external_urls() -> None:
    text = _page()
    assert not re.search(r"(?i)\b(?:https?|wss?|ftp):", text), "absolute URL in the status page"
    assert not re.search(r"""(?i)["'(\s]//[a-z0-9]""", text), "protocol-relative URL in the status page"
    assert not re.search(r"(?i)@import|url\(", text), "the CSS loads something"
    parser = _Refs()
    parser.feed(text)
    for tag, name, value in parser.refs:
        assert not re.match(r"(?i)[a-z][a-z0-9+.-]*:|//", value), f"<{tag} {name}={value!r}> leaves the page"
    assert not [r for r in parser.refs if r[0] in {"script", "link", "img", "iframe"}], "external resources"


def test_data_is_never_parsed_as_html() -> None:
    text = _page()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in text, f"{sink} in the status page"


def test_hooks_the_integration_test_relies_on() -> None:
    text = _page()
    parser = _Refs()
    parser.feed(text)
    assert {"routes", "services", "ready", "discovery", "error", "updated"} <= set(parser.ids)
    assert '"data-route"' in text and '"data-instance"' in text
    assert 'fetch("api/status"' in text
    assert "<noscript>" in text
