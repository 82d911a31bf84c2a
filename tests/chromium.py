"""Headless Chromium for the page tests: the DOM after the page's scripts ran, and a screenshot.

Debian's ``chromium`` package (``make test`` installs it where it can); tests that need it are skipped with a
reason where it is missing. ``--virtual-time-budget`` lets the page's timers and fetches run before the DOM is
dumped, so a page that fills itself by polling is seen filled.
"""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

BROWSER = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
needs_chromium = pytest.mark.skipif(
    BROWSER is None, reason="headless Chromium is not installed (apt-get install chromium; make test does it as root)"
)


def _run(url: str, *args: str, profile: Path, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    assert BROWSER is not None
    cmd = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--hide-scrollbars", f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args, url,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def dump_dom(url: str, tmp: Path) -> str:
    """The page's DOM as HTML after its scripts ran."""
    return _run(url, "--dump-dom", profile=tmp / "chromium-dom").stdout


def screenshot(url: str, path: Path, size: str = "1280,1600") -> Path:
    _run(url, f"--screenshot={path}", f"--window-size={size}", profile=path.parent / "chromium-shot")
    assert path.is_file() and path.stat().st_size > 1000, f"no screenshot at {path}"
    return path


class Elements(HTMLParser):
    """Every start tag as (tag, attributes), to count a page's elements by tag and class."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found.append((tag, {k: v or "" for k, v in attrs}))

    def select(self, tag: str, cls: str | None = None, **attrs: str) -> list[dict[str, str]]:
        out = []
        for t, a in self.found:
            if t != tag or (cls is not None and cls not in a.get("class", "").split()):
                continue
            if all(a.get(k.replace("_", "-")) == v for k, v in attrs.items()):
                out.append(a)
        return out
