"""Configuration: the schema's validation, which fills in every default (the schema is the
only place a default is written), and the rules across keys that the schema cannot state."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from saliency_robustness.errors import ConfigError, one_line
from saliency_robustness.grid import train_methods
from saliency_robustness.vocabulary import MODEL_NAME_PATTERN

# images per split of the built-in datasets: a subset larger than its split is a config error
SPLIT_SIZES = {"mnist": {"train": 60000, "test": 10000}, "cifar10": {"train": 50000, "test": 10000}}
DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}
#: class counts of the built-in datasets (an image folder has one class per folder)
DATASET_CLASSES = {"mnist": 10, "cifar10": 10}
MNIST_SPLIT_SIZES = SPLIT_SIZES["mnist"]
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "config.schema.yaml"


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


#: keys renamed since a release: old dotted key -> new one
RENAMED_KEYS = {"train.ensemble": "train.vectorized"}


def _message(error: jsonschema.ValidationError) -> str:
    key = _key_path(error)
    if key in RENAMED_KEYS:
        return f"config key '{key}' is now called '{RENAMED_KEYS[key]}'"
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
        for key, section, split in (("n_eval", "dataset", "test"), ("n_train", "train", "train"), ("n_train", "pretrain", "train")):
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
    if train["init"] == "base" and train["vectorized"]:
        raise ConfigError("config key 'train.vectorized': trains from model.weights only; set it to false with train.init: base")
    for section in ("train", "pretrain"):
        if checked["dataset"]["decode"] == "once" and checked[section]["num_workers"] > 0:
            # each loader worker would fill, and lose at the epoch's end, its own copy of the cache
            raise ConfigError(
                f"config key 'dataset.decode': once keeps the decoded images in the training process; "
                f"set {section}.num_workers to 0 (it is {checked[section]['num_workers']}) or decode per_epoch"
            )
    check_external_models(checked)
    attacks = checked["attacks"]
    if not attacks["store_adversarials"] and any(a["refine"] for a in attacks["ensemble"].values()):
        raise ConfigError(
            "config key 'attacks.store_adversarials': must be true when an attack has refine: true "
            "(it starts from the other attacks' stored adversarials)"
        )
    fractions = checked["quality"]["road"]["fractions"]
    if any(b <= a for a, b in zip(fractions, fractions[1:])):
        raise ConfigError(f"config key 'quality.road.fractions': {fractions} must increase strictly")
    return checked


def load_config(path: Path | str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, apply top-level overrides, validate it."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config file {path}: {one_line(exc)}") from None
    raw.update(overrides or {})
    return validate_config(raw)


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


