"""Configuration: schema validation with defaults, the model grid, and stage hashes.

Every stage receives a hash of its own config subset and of the package modules it
runs as a Snakemake ``params`` entry, so that exactly the changed stages rerun
(Snakemake tracks a ``script:`` file but not the modules it imports).
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from saliency_robustness.errors import ConfigError, DataError, one_line

PACKAGE = "saliency_robustness"
PACKAGE_DIR = Path(__file__).resolve().parent
# images per split of the built-in datasets: a subset larger than its split is a config error
SPLIT_SIZES = {"mnist": {"train": 60000, "test": 10000}, "cifar10": {"train": 50000, "test": 10000}}
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
#: class counts of the built-in datasets (an image folder has one class per folder)
DATASET_CLASSES = {"mnist": 10, "cifar10": 10}
MNIST_SPLIT_SIZES = SPLIT_SIZES["mnist"]
SCHEMA_PATH = PACKAGE_DIR.parent / "schemas" / "config.schema.yaml"


def _with_defaults(validator_class: type) -> type:
    """A validator that also fills in each property's ``default`` (jsonschema FAQ recipe)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        # the offending key is only named in the message: point at it directly
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        parts.append(extra[0] if extra else "?")
        return ".".join(parts)
    if error.validator == "required":
        missing = [k for k in error.validator_value if k not in error.instance]
        parts.append(missing[0] if missing else "?")
    return ".".join(parts) or "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    if error.validator == "additionalProperties":
        return f"unknown config key '{key}'"
    if error.validator == "required":
        return f"missing config key '{key}'"
    return f"config key '{key}': {error.message}"


def _non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The key path and value of the first NaN or infinite number in a config, if any."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def validate_config(config: Mapping[str, Any], schema_path: Path | str = SCHEMA_PATH) -> dict[str, Any]:
    """Return a validated copy of ``config`` with every default filled in.

    Raises :class:`ConfigError` with one line naming the first offending key.
    """
    schema = yaml.safe_load(Path(schema_path).read_text())
    checked = copy.deepcopy(dict(config))
    errors = sorted(_Validator(schema).iter_errors(checked), key=lambda e: list(e.absolute_path))
    if errors:
        # the most specific error first: deepest path, then schema order
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(_message(best))
    # JSON Schema's bounds let NaN through (every comparison with it is false), and YAML
    # writes .nan and .inf: no setting of this pipeline means either
    found = _non_finite(checked)
    if found is not None:
        raise ConfigError(f"config key '{found[0]}': {found[1]} is not a finite number")
    kind = checked["dataset"]["kind"]
    if kind in SPLIT_SIZES:
        for key, section, split in (("n_eval", "dataset", "test"), ("n_train", "train", "train")):
            n, size = checked[section][key], SPLIT_SIZES[kind][split]
            if n is not None and n > size:
                raise ConfigError(f"config key '{section}.{key}': {n} is more than the {size} images of {DATASET_NAMES[kind]}'s {split} split")
    raw_train, train = config.get("train") or {}, checked["train"]
    if train["seeds"] is not None:
        # seed is short for seeds: [seed]; both may stand only if they agree (a validated config
        # validates again unchanged)
        if "seed" in raw_train and raw_train["seed"] not in train["seeds"]:
            raise ConfigError(
                f"config key 'train.seed': {raw_train['seed']} is not among train.seeds {train['seeds']} (seed is short for seeds: [seed]; keep one)"
            )
        train["seed"] = train["seeds"][0]
    if checked["dataset"]["decode"] == "once" and train["num_workers"] > 0:
        # each loader worker would fill, and lose at the epoch's end, its own copy of the cache
        raise ConfigError(
            f"config key 'dataset.decode': once keeps the decoded images in the training process; "
            f"set train.num_workers to 0 (it is {train['num_workers']}) or decode per_epoch"
        )
    check_external_models(checked)
    attacks = checked["attacks"]
    if not attacks["store_adversarials"] and any(a["refine"] for a in attacks["ensemble"].values()):
        raise ConfigError(
            "config key 'attacks.store_adversarials': must be true when an attack has refine: true "
            "(it starts from the other attacks' stored adversarials)"
        )
    return checked


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply top-level overrides, validate it."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {one_line(exc)}") from None
    raw.update(overrides or {})
    return validate_config(raw)


#: training method -> (its strength's config key, the model-name prefix before the strength)
METHODS = {"gradnorm": ("lambdas", "gradnorm-lambda"), "adversarial": ("adversarial.epsilons", "pgd-eps")}
# what a model name looks like (the Snakemake wildcard constraint is built from it)
MODEL_NAME_PATTERN = "(?:" + "|".join(prefix for _, prefix in METHODS.values()) + r")[0-9.e+-]+-seed[0-9]+"


@dataclass(frozen=True)
class GridPoint:
    """One model of the training grid: a training method, its strength and a replicate seed.

    The strength is the regularization weight lambda for ``gradnorm`` and the radius epsilon of
    the L2 ball for ``adversarial`` (PGD) training.
    """

    method: str
    strength: float
    seed: int

    @property
    def lam(self) -> float:
        """The gradient-norm penalty's weight (0 for adversarially trained models)."""
        return self.strength if self.method == "gradnorm" else 0.0

    @property
    def epsilon(self) -> float | None:
        """The PGD radius (None for gradient-norm models)."""
        return self.strength if self.method == "adversarial" else None


#: the method of the models the pipeline did not train (``models.external``)
EXTERNAL = "external"


def check_external_models(config: Mapping[str, Any]) -> None:
    """The rules the schema cannot state: unique names unlike a trained model's, either
    ``architecture`` + ``weights`` or ``robustbench``, and at least one model in all."""
    seen: set[str] = set()
    for i, entry in enumerate(config["models"]["external"]):
        where = f"config key 'models.external[{i}]' ({entry['name']})"
        if entry["name"] in seen:
            raise ConfigError(f"{where}: the name appears twice")
        seen.add(entry["name"])
        if re.fullmatch(MODEL_NAME_PATTERN, entry["name"]):
            raise ConfigError(f"{where}: the name looks like a trained model's (gradnorm-.../pgd-...); choose another")
        if "robustbench" in entry:
            extra = sorted({"weights", "architecture", "input_space"} & set(entry))
            if extra:
                raise ConfigError(f"{where}: a robustbench entry takes no {extra[0]} (the library builds the model; its input is the [0, 1] image)")
        elif "weights" not in entry or "architecture" not in entry:
            missing = "weights" if "weights" not in entry else "architecture"
            raise ConfigError(f"{where}: missing '{missing}' (give architecture and weights, or robustbench)")
    if not train_methods(config["train"]) and not config["models"]["external"]:
        raise ConfigError("config key 'train.method': empty and models.external is empty too: there is no model to analyse")


def resolve_path(path: str, data_root: str | Path) -> Path:
    """``path`` with ``~`` expanded, taken from ``data_root`` when relative."""
    resolved = Path(path).expanduser()
    return resolved if resolved.is_absolute() else Path(data_root).expanduser() / resolved


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


def external_models(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> entry of every ``models.external`` model, in the config's order."""
    return {entry["name"]: dict(entry) for entry in config["models"]["external"]}


def format_lambda(lam: float) -> str:
    """The shortest text that reads back as ``lam`` (``-0.0`` as ``0``; ``10.0`` as ``10``),
    so that distinct values always get distinct names."""
    text = repr(float(lam) + 0.0)
    return text.removesuffix(".0")


def model_name(strength: float, seed: int = 0, method: str = "gradnorm") -> str:
    """Readable wildcard value for the model trained by ``method`` with ``strength`` from ``seed``."""
    return f"{METHODS[method][1]}{format_lambda(strength)}-seed{seed}"


def train_seeds(train: Mapping[str, Any]) -> list[int]:
    """The replicate seeds: ``train.seeds``, or ``[train.seed]`` for single-seed configs."""
    return list(train["seeds"]) if train.get("seeds") is not None else [train["seed"]]


def train_methods(train: Mapping[str, Any]) -> list[str]:
    """``train.method`` as a list (one method or several)."""
    method = train["method"]
    return [method] if isinstance(method, str) else list(method)


def method_strengths(train: Mapping[str, Any], method: str) -> list[float]:
    """The strengths of ``method`` in the config's order (lambdas, or the PGD epsilons)."""
    return list(train["lambdas"]) if method == "gradnorm" else list(train["adversarial"]["epsilons"])


def model_grid(config: Mapping[str, Any]) -> dict[str, GridPoint]:
    """Model name -> (method, strength, seed) for every method x strength x seed, in the
    config's order (method-major, then strength)."""
    train = config["train"]
    grid: dict[str, GridPoint] = {}
    for method in train_methods(train):
        key = METHODS[method][0]
        strengths = [float(v) + 0.0 for v in method_strengths(train, method)]
        if not strengths:
            raise ConfigError(f"config key 'train.{key}': empty, but train.method includes {method}")
        for name, values in ((key, strengths), ("seeds", train_seeds(train))):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"config key 'train.{name}': {repeated[0]:g} appears twice")
        for strength in strengths:
            for seed in train_seeds(train):
                grid[model_name(strength, seed, method)] = GridPoint(method, strength, int(seed))
    return grid


def model_train_settings(train: Mapping[str, Any], point: GridPoint) -> dict[str, Any]:
    """The ``train`` section as one model of the grid sees it: its own seed, and none of the
    grid's lists (other strengths, seeds or methods are not this model's settings), so that
    adding a model to the grid retrains no other. PGD options belong to adversarial models only."""
    settings = {k: v for k, v in train.items() if k not in ("lambdas", "seeds", "method", "adversarial")}
    if point.method == "adversarial":
        settings["adversarial"] = {k: v for k, v in train["adversarial"].items() if k != "epsilons"}
    return {**settings, "seed": point.seed}


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
    return found


def imported_modules(module: str) -> set[str]:
    """The package modules that ``module`` imports directly."""
    path = module_file(module)
    if path is None:
        raise ValueError(f"{module!r} is not a module of {PACKAGE}")
    return _imported_modules(path.read_text())


def stage_modules(script: str) -> set[str]:
    """The package modules the stage entry point ``workflow/scripts/<script>.py`` runs: its
    imports and theirs, transitively. Derived from the source, so it cannot drift."""
    todo = sorted(_imported_modules((SCRIPTS_DIR / f"{script}.py").read_text()))
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


def export_package_path() -> None:
    """Let Snakemake jobs import this package from its checkout, also inside a conda env
    (or on a cluster node) where it was never installed; quiet foolbox's git probe."""
    package_parent = str(PACKAGE_DIR.parent)
    paths = [package_parent] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
