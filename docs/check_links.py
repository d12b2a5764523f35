"""Offline check of the built site's internal links: every ``href``/``src`` to a local file must point
at a file that exists, and every ``#anchor`` at an ``id`` (or ``name``) in the target page.

Usage: ``python docs/check_links.py docs/_build/html`` (``make docs`` runs it; exit status 1 and one
line per broken link when something is broken). External links (``http(s):``, ``mailto:``) are not
fetched: the build and this check are offline.
"""

from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

SKIP_SCHEMES = ("http", "https", "mailto", "data", "javascript", "ftp")


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[tuple[str, str]] = []   # (attribute, value)

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name") and (name == "id" or tag == "a"):
                self.ids.add(value)
            elif (name == "href" and tag in ("a", "link", "area")) or (name == "src" and tag in ("img", "script", "source")):
                self.links.append((name, value))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def check(root) -> list[str]:
    """Broken internal links of the HTML site in ``root``.

    Parameters
    ----------
    root
        The folder of the built site (``docs/_build/html``).

    Returns
    -------
    list of str
        One ``"page: link (why)"`` line per broken link; empty when every link resolves.
    """
    root = Path(root).resolve()
    # the theme's template fragments in _static/ are not pages
    pages = {p: _parse(p) for p in root.rglob("*.html") if p.relative_to(root).parts[0] not in ("_static", "_sources")}
    broken = []
    for page, parsed in pages.items():
        for attr, link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme in SKIP_SCHEMES or link.startswith("//"):
                continue
            rel = page.relative_to(root)
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not str(target).startswith(str(root)):
                broken.append(f"{rel}: {link} (points outside the site)")
                continue
            if not target.exists():
                broken.append(f"{rel}: {link} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{rel}: {link} (no anchor #{parts.fragment})")
    return sorted(set(broken))


def main(argv=None) -> int:
    """Command-line entry point.

    Parameters
    ----------
    argv
        ``[site_folder]``; default ``docs/_build/html``.

    Returns
    -------
    int
        0 when every internal link resolves, else 1.
    """
    argv = sys.argv[1:] if argv is None else argv
    root = Path(argv[0] if argv else "docs/_build/html")
    if not (root / "index.html").exists():
        print(f"check_links: {root} has no index.html; build the site first (make docs)", file=sys.stderr)
        return 1
    broken = check(root)
    n_pages = sum(1 for p in root.rglob("*.html") if p.relative_to(root).parts[0] != "_static")
    for line in broken:
        print(line)
    print(f"check_links: {n_pages} pages, {len(broken)} broken internal links")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
