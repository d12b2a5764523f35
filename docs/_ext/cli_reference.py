"""Render the ``dgdlens`` command line's reference from its argparse parser at build time.

The Sphinx extension writes ``docs/cli_generated.md`` (git-ignored) when the build starts; ``cli.md``
includes it. Rendering ``format_help()`` of the real parser (instead of a third-party directive that
re-interprets argparse internals) cannot drift from what ``dgdlens COMMAND --help`` prints, and has no
dependency beyond the package itself. ``render(parser)`` is also used by ``tests/test_docs.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

OUT_NAME = "cli_generated.md"


def render(parser) -> str:
    """The Markdown of the CLI reference: the top-level help, then one section per subcommand.

    Parameters
    ----------
    parser
        The ``argparse.ArgumentParser`` of ``dgdlens`` (``dgdlens.cli.build_parser()``), with its
        subcommands in ``parser.subcommands``.

    Returns
    -------
    str
        MyST Markdown: a ``## `dgdlens NAME``` heading and a literal block of its ``--help`` per
        subcommand.
    """
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"   # argparse wraps to the terminal width: fix it for a stable page
    try:
        parts = ["## `dgdlens`", "", "```text", parser.format_help().rstrip(), "```", ""]
        for name, sub in parser.subcommands.items():
            parts += [f"## `dgdlens {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "\n".join(parts)


def _write(app) -> None:
    from dgdlens.cli import build_parser

    text = render(build_parser())
    path = Path(app.srcdir) / OUT_NAME
    if not path.exists() or path.read_text() != text:   # unchanged: keep the mtime, no re-read
        path.write_text(text)


def setup(app):
    """Sphinx entry point: regenerate the CLI reference when the build starts.

    Parameters
    ----------
    app
        The Sphinx application.

    Returns
    -------
    dict
        Extension metadata (parallel-safe).
    """
    app.connect("builder-inited", _write)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
