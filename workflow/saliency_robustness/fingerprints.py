"""What identifies a stage's work: hashes of config subsets, of the package source a stage
runs, and of the external models' weights.

Every stage receives a hash of its own config subset and of the package modules it runs as a
Snakemake ``params`` entry, so that exactly the changed stages rerun (Snakemake tracks a
``script:`` file but not the modules it imports). The modules are traced from the source, so
the list cannot drift. An external model is the content of its weights, not where they lie.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from saliency_robustness.config import resolve_path
from saliency_robustness.errors import DataError

PACKAGE = "saliency_robustness"
PACKAGE_DIR = Path(__file__).resolve().parent


def fingerprint(value: Any) -> str:
    """Short stable hash of a JSON-serialisable value."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


SCRIPTS_DIR = PACKAGE_DIR.parent / "scripts"


def module_file(module: str) -> Path | None:
    """The source file of ``module`` (dotted, relative to the package: ``"stages.attacks"``),
    or None when it is not a module of this package."""
    base = PACKAGE_DIR.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_modules(source: str) -> set[str]:
    """Modules of this package (dotted, relative to it) that ``source`` imports anywhere,
    also inside functions; importing ``stages.x`` also runs ``stages/__init__.py``."""
    return set(_imports_in(source, PACKAGE_DIR))


@functools.lru_cache(maxsize=1024)
def _imports_in(source: str, package_dir: Path) -> frozenset[str]:
    """:func:`_imported_modules`, parsed once per source text and package folder: every job of
    a dry run fingerprints its stage, and parsing the same modules again for each was most of
    the Snakefile's parse time."""
    del package_dir  # a key only: module_file reads PACKAGE_DIR
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] != PACKAGE:
                continue
            for end in range(2, len(parts) + 1):
                module = ".".join(parts[1:end])
                if module_file(module) is not None:
                    found.add(module)
    return frozenset(found)


def imported_modules(module: str) -> set[str]:
    """The package modules that ``module`` imports directly."""
    path = module_file(module)
    if path is None:
        raise ValueError(f"{module!r} is not a module of {PACKAGE}")
    return _imported_modules(path.read_text())


def stage_modules(script: str) -> set[str]:
    """The package modules the stage entry point ``workflow/scripts/<script>.py`` runs: its
    imports and theirs, transitively. Derived from the source, so it cannot drift."""
    return _closure(_imported_modules((SCRIPTS_DIR / f"{script}.py").read_text()))


def module_closure(module: str) -> set[str]:
    """``module`` and the package modules it imports, transitively."""
    return _closure({module})


def _closure(modules: Iterable[str]) -> set[str]:
    todo = sorted(modules)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_modules(module) - seen)
    return seen


def code_fingerprint(modules: Iterable[str]) -> str:
    """Hash of the source of the named modules of this package (e.g. ``["stages.training", "models"]``)."""
    digest = hashlib.sha256()
    for module in sorted(set(modules)):
        path = module_file(module)
        if path is None:
            raise ValueError(f"{module!r} is not a module of {PACKAGE}")
        digest.update(module.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def robustbench_files(robustbench: Mapping[str, Any], data_root: str | Path) -> list[Path]:
    """The checkpoint file(s) ``robustbench.utils.load_model`` reads for the entry:
    ``<model_dir>/<dataset>/<threat_model>/<name>.pt``, or ``<name>.pt_m<i>.pt`` for each
    member of one of its ensembles."""
    folder = resolve_path(robustbench["model_dir"], data_root) / robustbench["dataset"] / robustbench["threat_model"]
    single = folder / f"{robustbench['name']}.pt"
    members = []
    while Path(f"{single}_m{len(members)}.pt").is_file():
        members.append(Path(f"{single}_m{len(members)}.pt"))
    return members if members and not single.is_file() else [single]


def external_weight_files(entry: Mapping[str, Any], data_root: str | Path) -> list[Path]:
    """The file(s) holding an external model's weights."""
    if "robustbench" in entry:
        return robustbench_files(entry["robustbench"], data_root)
    return [resolve_path(entry["weights"], data_root)]


def content_hash(files: Iterable[Path]) -> str:
    """SHA-256 of the files' contents (not of their names or times)."""
    digest = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def external_weights_hash(entry: Mapping[str, Any], data_root: str | Path) -> str:
    """The content hash of an external model's weights; a missing file is a one-line error
    naming the entry and the path."""
    files = external_weight_files(entry, data_root)
    for path in files:
        what = "RobustBench checkpoint" if "robustbench" in entry else "weights file"
        if path.is_dir():
            raise DataError(f"external model {entry['name']!r}: {what} {path} is a directory; name the file in it")
        if not path.is_file():
            raise DataError(f"external model {entry['name']!r}: {what} {path} not found (relative paths are taken from data_root)")
    return content_hash(files)


def package_versions(*names: str) -> dict[str, str | None]:
    """The installed version of each distribution (None: not installed), read without importing it."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None if importlib.util.find_spec(name) is None else "unknown"
    return versions


def checked_once(directory: str | Path, what: str, identity: Any, check: Callable[[], None]) -> bool:
    """Run ``check`` (which raises on a bad setting) unless it already passed for ``identity``
    (the settings checked, the code that checks them, the package versions it uses); record a
    pass in ``directory``. Returns whether the check ran. A failure records nothing, so it
    repeats until the setting is fixed."""
    marker = Path(directory) / f"{what}-{fingerprint(identity)}.ok"
    if marker.is_file():
        return False
    check()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(identity, sort_keys=True, default=str) + "\n")
    return True
