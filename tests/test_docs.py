"""The documentation's contracts, checked without building the site.

- Every public name (each public module's ``__all__``) has a numpydoc docstring: a ``Parameters``
  section when it takes parameters and a ``Returns`` (or ``Yields``) section when it returns something;
  for a class, the class docstring documents the ``__init__`` parameters, and its public methods follow
  the same rules as functions.
- Every CLI subcommand appears in the CLI reference page (rendered from the argparse parser at build
  time by ``docs/_ext/cli_reference.py``).
- Every public module and every public name is listed in the API reference (``docs/api/*.md``).
- The built site's internal links and anchors resolve (only when ``docs/_build/html`` exists).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# The public modules documented in the API reference. ``dgdlens.pl`` is an alias of ``dgdlens.plotting``.
PUBLIC_MODULES = [
    "dgdlens", "dgdlens.tl", "dgdlens.plotting", "dgdlens.models", "dgdlens.train", "dgdlens.sae",
    "dgdlens.lens", "dgdlens.evaluate", "dgdlens.data", "dgdlens.nn", "dgdlens.sim", "dgdlens.steer", "dgdlens.perturb",
    "dgdlens.report",
]

SECTION = re.compile(r"^\s*(?P<name>[A-Z][A-Za-z ]+)\n\s*-{3,}\s*$", re.M)


def _module(name: str):
    # ``dgdlens.steer`` is both a module and (as an attribute of the package) the function ``steer``.
    importlib.import_module(name)
    return sys.modules[name]


def _sections(doc: str) -> set[str]:
    return {m.group("name").strip() for m in SECTION.finditer(inspect.cleandoc(doc))}


def _own_params(func, *, drop_first: bool = False) -> list[str]:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    params = list(sig.parameters.values())
    if drop_first and params:
        params = params[1:]
    return [p.name for p in params]


def _returns_something(func) -> bool:
    """True when the function returns a value: its annotation says so, or (unannotated) its source has
    a ``return <value>``; generators count through ``yield``."""
    func = inspect.unwrap(func)
    ann = getattr(func, "__annotations__", {}).get("return", inspect.Signature.empty)
    if ann is not inspect.Signature.empty:
        return ann not in (None, "None", type(None), "NoReturn", "typing.NoReturn")
    try:
        src = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError):
        return False
    fn = tree.body[0]
    for node in ast.walk(fn):
        if node is not fn and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return True
    return False


def _check_function(qualname: str, func, problems: list[str], *, method: bool = False) -> None:
    doc = inspect.getdoc(func) if not method else (func.__doc__ or "")
    if not doc or not doc.strip():
        problems.append(f"{qualname}: no docstring")
        return
    sections = _sections(doc)
    params = [p for p in _own_params(func, drop_first=method) if p not in ("self", "cls")]
    if params and "Parameters" not in sections and "Other Parameters" not in sections:
        problems.append(f"{qualname}: takes {params} but its docstring has no Parameters section")
    if _returns_something(func) and not sections & {"Returns", "Yields"}:
        problems.append(f"{qualname}: returns a value but its docstring has no Returns section")


def _is_dataclass_like(cls) -> bool:
    return dataclasses.is_dataclass(cls) or (issubclass(cls, tuple) and hasattr(cls, "_fields"))


def _own_methods(cls):
    """Public methods, class methods, static methods and properties defined by a dgdlens class itself."""
    for name, attr in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            yield name, attr, "property"
        elif isinstance(attr, (classmethod, staticmethod)):
            yield name, attr.__func__, "classmethod" if isinstance(attr, classmethod) else "static"
        elif inspect.isfunction(attr):
            yield name, attr, "method"


def _check_class(qualname: str, cls, problems: list[str]) -> None:
    doc = cls.__doc__
    if not doc or not doc.strip():
        problems.append(f"{qualname}: no class docstring")
        return
    sections = _sections(doc)
    init = cls.__dict__.get("__init__")
    if init is None:  # inherited: only a dgdlens base counts (a dataclass defines its own __init__)
        for base in cls.__mro__[1:]:
            if base.__module__.startswith("dgdlens") and "__init__" in base.__dict__:
                init = base.__dict__["__init__"]
                break
    if init is not None and inspect.isfunction(init):
        params = [p for p in _own_params(init, drop_first=True)]
        if params:
            ok = {"Parameters", "Other Parameters"}
            if _is_dataclass_like(cls):
                ok |= {"Attributes"}
            if not sections & ok:
                problems.append(f"{qualname}: __init__ takes {params} but the class docstring has no "
                                "Parameters section")
    for name, attr, kind in _own_methods(cls):
        mq = f"{qualname}.{name}"
        if getattr(attr, "__module__", "") and not str(getattr(attr, "__module__", "")).startswith("dgdlens"):
            continue
        if kind == "property":
            if not (attr.__doc__ or "").strip():
                problems.append(f"{mq}: property without a docstring")
            continue
        _check_function(mq, attr, problems, method=(kind in ("method", "classmethod")))


def _public_objects():
    seen = set()
    for modname in PUBLIC_MODULES:
        mod = _module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.ismodule(obj):
                continue
            if not (inspect.isclass(obj) or callable(obj)):
                continue  # constants are documented in the API pages themselves
            key = id(obj)
            if key in seen:
                continue
            seen.add(key)
            yield f"{modname}.{name}", obj


def docstring_problems() -> list[str]:
    problems: list[str] = []
    for qualname, obj in _public_objects():
        if inspect.isclass(obj):
            _check_class(qualname, obj, problems)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj) or callable(obj):
            _check_function(qualname, obj, problems)
    return problems


# Gaps that existed when this test was written (one problem a line, as ``docstring_problems`` words
# it). The list only shrinks: a new public name or method must be documented, and a line whose gap
# has been fixed must be deleted (the second test says which).
GAPS_FILE = Path(__file__).with_name("docstring_gaps.txt")


def _known_gaps() -> set[str]:
    if not GAPS_FILE.exists():
        return set()
    return {line.strip() for line in GAPS_FILE.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def test_public_names_have_numpydoc_docstrings():
    new = [p for p in docstring_problems() if p not in _known_gaps()]
    assert not new, (f"{len(new)} public names are under-documented (numpydoc: a Parameters section when "
                     "it takes parameters, Returns when it returns something):\n" + "\n".join(new))


def test_docstring_gap_list_has_no_fixed_entries():
    fixed = sorted(_known_gaps() - set(docstring_problems()))
    assert not fixed, (f"documented now, delete these lines from {GAPS_FILE.name}:\n" + "\n".join(fixed))


# --------------------------------------------------------------------------------------- API reference

def test_every_public_name_is_in_the_api_reference():
    text = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    missing = []
    for modname in PUBLIC_MODULES:
        mod = _module(modname)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.ismodule(obj) or name in ("__version__", "pl"):
                continue
            if not re.search(rf"(^|[\s.`]){re.escape(name)}($|[\s`(])", text, re.M):
                missing.append(f"{modname}.{name}")
    assert not missing, "not in docs/api/*.md: " + ", ".join(missing)


# --------------------------------------------------------------------------------------- CLI reference

def _cli_module():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        return importlib.import_module("cli_reference")
    finally:
        sys.path.pop(0)


def test_every_cli_subcommand_is_in_the_cli_reference():
    from dgdlens.cli import build_parser

    parser = build_parser()
    subcommands = sorted(parser.subcommands)
    assert subcommands, "the parser has no subcommands"
    page = _cli_module().render(parser)
    for name in subcommands:
        assert re.search(rf"^## `dgdlens {name}`$", page, re.M), f"no section for `dgdlens {name}`"
        # every option of the subcommand is shown
        for action in parser.subcommands[name]._actions:
            for opt in action.option_strings:
                assert opt in page, f"`dgdlens {name}` option {opt} missing from the CLI reference"
    # the page that Sphinx builds includes the generated file
    assert "cli_generated.md" in (DOCS / "cli.md").read_text()


# --------------------------------------------------------------------------------------- built site

@pytest.mark.skipif(not (DOCS / "_build" / "html" / "index.html").exists(), reason="site not built (make docs)")
def test_built_site_has_no_broken_internal_links():
    sys.path.insert(0, str(DOCS))
    try:
        checker = importlib.import_module("check_links")
    finally:
        sys.path.pop(0)
    broken = checker.check(DOCS / "_build" / "html")
    assert not broken, "\n".join(broken[:50])


@pytest.mark.skipif(not (DOCS / "_build" / "html" / "index.html").exists(), reason="site not built (make docs)")
def test_every_tutorial_page_shows_figures():
    pages = sorted((DOCS / "_build" / "html" / "tutorials").glob("0*.html"))
    assert len(pages) == len(sorted((DOCS / "tutorials").glob("0*.md")))
    for page in pages:
        n_images = page.read_text().count("<img")
        assert n_images >= 1, f"{page.name} shows no figure"
