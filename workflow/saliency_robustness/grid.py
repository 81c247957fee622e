"""The models of an experiment: the training grid (method x strength x seed) and the external
models, by name, from the validated config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from saliency_robustness.errors import ConfigError
from saliency_robustness.vocabulary import ADVERSARIAL, GRADNORM, METHODS, model_name


@dataclass(frozen=True)
class GridPoint:
    """One model of the training grid: a training method, its strength and a replicate seed.

    The strength is the regularization weight lambda for ``gradnorm`` and the radius epsilon of
    the L2 ball for ``adversarial`` (PGD) training. The pair travels as one value, from here to
    the model's spec (``models.ModelSpec``).
    """

    method: str
    strength: float
    seed: int


def train_seeds(train: Mapping[str, Any]) -> list[int]:
    """The replicate seeds: ``train.seeds``, or ``[train.seed]`` for single-seed configs."""
    return list(train["seeds"]) if train["seeds"] is not None else [train["seed"]]


def train_methods(train: Mapping[str, Any]) -> list[str]:
    """``train.method`` as a list (one method or several)."""
    method = train["method"]
    return [method] if isinstance(method, str) else list(method)


def method_strengths(train: Mapping[str, Any], method: str) -> list[float]:
    """The strengths of ``method`` in the config's order (lambdas, or the PGD epsilons)."""
    return list(train["lambdas"]) if method == GRADNORM else list(train["adversarial"]["epsilons"])


def model_grid(config: Mapping[str, Any]) -> dict[str, GridPoint]:
    """Model name -> (method, strength, seed) for every method x strength x seed, in the
    config's order (method-major, then strength)."""
    train = config["train"]
    grid: dict[str, GridPoint] = {}
    for method in train_methods(train):
        key = METHODS[method].config_key
        strengths = [float(v) + 0.0 for v in method_strengths(train, method)]
        if not strengths:
            raise ConfigError(f"config key 'train.{key}': empty, but train.method includes {method}")
        for name, values in ((key, strengths), ("seeds", train_seeds(train))):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"config key 'train.{name}': {repeated[0]:g} appears twice")
        for strength in strengths:
            for seed in train_seeds(train):
                grid[model_name(method, strength, seed)] = GridPoint(method, strength, int(seed))
    return grid


def model_train_settings(train: Mapping[str, Any], point: GridPoint) -> dict[str, Any]:
    """The ``train`` section as one model of the grid sees it: its own seed, and none of the
    grid's lists (other strengths, seeds or methods are not this model's settings), so that
    adding a model to the grid retrains no other. PGD options belong to adversarial models only."""
    settings = {k: v for k, v in train.items() if k not in ("lambdas", "seeds", "method", "adversarial")}
    if point.method == ADVERSARIAL:
        settings["adversarial"] = {k: v for k, v in train["adversarial"].items() if k != "epsilons"}
    return {**settings, "seed": point.seed}


def external_models(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Name -> entry of every ``models.external`` model, in the config's order."""
    return {entry["name"]: dict(entry) for entry in config["models"]["external"]}


#: the ``train`` keys that describe the grid, not one model's recipe (no model sees them)
_GRID_KEYS = ("lambdas", "seeds", "method", "adversarial", "init", "vectorized")
#: the train keys that only a model with a penalty reads (the base model's settings leave them out)
PENALTY_KEYS = ("penalty_gradient", "finite_difference_step", "penalty_interval", "penalty_fraction")


def fine_tunes_base(config: Mapping[str, Any]) -> bool:
    """Whether every grid model fine-tunes the base model (``train.init: base``)."""
    return config["train"]["init"] == "base"


def pretrain_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The base model's ``train`` section: the ``pretrain`` recipe (no penalty, no PGD) over
    ``train``'s loss options (sensitivity, p: the spec's), without the grid's keys, the
    penalty's own keys (a fine-tune setting: changing one must not retrain the base) or
    ``pretrain.threads`` (how many cores run it does not change what it is)."""
    recipe = {k: v for k, v in config["pretrain"].items() if k != "threads"}
    shared = {k: v for k, v in config["train"].items() if k not in (*_GRID_KEYS, *PENALTY_KEYS, *recipe)}
    return {**shared, **recipe}
