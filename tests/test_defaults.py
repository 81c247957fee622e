"""Defaults live in the config schema only (workflow/schemas/config.schema.yaml): the package
reads the validated config, which the schema filled in. This test reads the package's source
and fails where a schema default is written again, as far as it can see one:

- a dataclass field or a function parameter named like a schema key, with that key's default
  as its default;
- ``.get("<key>", <default>)`` on a schema key that has a default (the key is always there).

``None`` and empty defaults mean "not given" and are left alone. A literal passed as a
keyword argument is not checked: other libraries' keywords share names with schema keys
(scipy's ``vectorized``), and a call that means the value (the refining attacks need the
adversarials stored) is not a restated default.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from saliency_robustness.config import SCHEMA_PATH
from saliency_robustness.fingerprints import PACKAGE_DIR


def schema_defaults(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted path, key, default) of every property with a scalar, non-empty default."""
    for key, sub in (schema.get("properties") or {}).items():
        where = f"{path}.{key}" if path else key
        if isinstance(sub, dict):
            default = sub.get("default")
            if default is not None and not isinstance(default, dict | list) and default != "":
                yield where, key, default
            yield from schema_defaults(sub, where)
            for branch in ("items", "additionalProperties"):
                if isinstance(sub.get(branch), dict):
                    yield from schema_defaults(sub[branch], where)


DEFAULTS = list(schema_defaults(yaml.safe_load(SCHEMA_PATH.read_text())))
BY_KEY: dict[str, list[tuple[str, Any]]] = {}
for _path, _key, _default in DEFAULTS:
    BY_KEY.setdefault(_key, []).append((_path, _default))


def _literal(node: ast.AST | None) -> Any:
    try:
        return ast.literal_eval(node) if node is not None else None
    except ValueError:
        return None



def restatements(source: str) -> list[str]:
    """Where ``source`` restates a schema default, as ``line: what``."""
    found: list[str] = []

    def check(name: str, value: Any, line: int, what: str) -> None:
        for path, default in BY_KEY.get(name, []):
            if value is not None and value == default and isinstance(value, bool) == isinstance(default, bool):
                found.append(f"{line}: {what} {name}={value!r} restates the schema default of {path}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    check(item.target.id, _literal(item.value), item.lineno, "field")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            positional = node.args.posonlyargs + node.args.args
            for arg, default in zip(positional[len(positional) - len(node.args.defaults) :], node.args.defaults):
                check(arg.arg, _literal(default), node.lineno, "parameter")
            for arg, default in zip(node.args.kwonlyargs, node.args.kw_defaults):
                check(arg.arg, _literal(default), node.lineno, "parameter")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr == "get" and len(node.args) == 2:
                key = _literal(node.args[0])
                if isinstance(key, str):
                    check(key, _literal(node.args[1]), node.lineno, ".get")
    return found


MODULES = sorted(p for p in PACKAGE_DIR.rglob("*.py"))


def test_the_schema_has_defaults_to_protect() -> None:
    keys = {key for _, key, _ in DEFAULTS}
    assert {"sensitivity", "p", "confidence_level", "n_resamples", "steps", "dpi"} <= keys, sorted(keys)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_no_module_restates_a_schema_default(path: Path) -> None:
    found = restatements(path.read_text())
    assert not found, f"{path.relative_to(PACKAGE_DIR)}:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        "from dataclasses import dataclass\n@dataclass\nclass A:\n    confidence_level: float = 0.95\n",
        "def f(*, sensitivity='loss'):\n    pass\n",
        "def f(x, p=2.0):\n    pass\n",
        "level = attrs.get('confidence_level', 0.95)\n",
    ],
)
def test_the_rule_would_catch_a_restated_default(source: str) -> None:
    assert restatements(source)
