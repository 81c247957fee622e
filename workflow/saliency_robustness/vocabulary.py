"""The names the stages share: training methods and their strengths, model names, attribution
maps, statistics, and the files of a model directory.

A base module with no imports beyond the standard library, so that the Snakefile, every stage
and the tests read one definition of each name (docs/spec.md uses the same ones).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# --- training methods -----------------------------------------------------------------------

GRADNORM = "gradnorm"  # gradient-norm (double-backprop) regularization; strength: lambda
ADVERSARIAL = "adversarial"  # L2 PGD adversarial training; strength: the radius epsilon
EXTERNAL = "external"  # a model the pipeline did not train (models.external); no strength
BASE = "base"  # the base model every grid point fine-tunes from (train.init: base); strength 0


@dataclass(frozen=True)
class Method:
    """A training method: the name of its strength, where the config lists the strengths (a
    dotted key under ``train``) and the model-name prefix before the strength."""

    name: str
    strength: str | None
    config_key: str | None
    prefix: str | None


#: every method, in the order models are stacked and plotted
METHODS = {
    BASE: Method(BASE, None, None, None),
    GRADNORM: Method(GRADNORM, "lambda", "lambdas", "gradnorm-lambda"),
    ADVERSARIAL: Method(ADVERSARIAL, "epsilon", "adversarial.epsilons", "pgd-eps"),
    EXTERNAL: Method(EXTERNAL, None, None, None),
}
#: the methods the pipeline trains with (``train.method``)
TRAINED_METHODS = tuple(name for name, method in METHODS.items() if method.prefix is not None)

# --- model names ------------------------------------------------------------------------------

#: the base model's name (rule pretrain writes models/base/)
BASE_MODEL = "base"
#: what a trained model's name looks like (the Snakemake wildcard constraint is built from it)
#: a model of the training grid (method x strength x seed)
GRID_MODEL_PATTERN = "(?:" + "|".join(METHODS[m].prefix or "" for m in TRAINED_METHODS) + r")[0-9.e+-]+-seed[0-9]+"
#: any model the pipeline trains: a grid model or the base
MODEL_NAME_PATTERN = f"(?:{GRID_MODEL_PATTERN}|{BASE_MODEL})"
_MODEL_NAME = re.compile("(" + "|".join(re.escape(METHODS[m].prefix or "") for m in TRAINED_METHODS) + r")([0-9.e+-]+)-seed([0-9]+)")


def format_strength(strength: float) -> str:
    """The shortest text that reads back as ``strength`` (``-0.0`` as ``0``; ``10.0`` as
    ``10``), so that distinct values always get distinct names."""
    text = repr(float(strength) + 0.0)
    return text.removesuffix(".0")


def model_name(method: str, strength: float, seed: int) -> str:
    """The trained model's name, e.g. ``gradnorm-lambda0.3-seed1`` or ``pgd-eps1.5-seed0``."""
    return f"{METHODS[method].prefix}{format_strength(strength)}-seed{seed}"


def parse_model_name(name: str) -> tuple[str, float, int] | None:
    """(method, strength, seed) of a trained model's name; None for any other name."""
    found = _MODEL_NAME.fullmatch(name)
    if found is None:
        return None
    method = next(m for m in TRAINED_METHODS if METHODS[m].prefix == found[1])
    try:
        strength = float(found[2])
    except ValueError:
        return None
    return (method, strength, int(found[3])) if math.isfinite(strength) else None


def grid_point_name(name: str) -> str:
    """A trained model's name without its seed (``gradnorm-lambda0.3``): the name of its grid
    point; any other name is a grid point of its own."""
    return name.rpartition("-seed")[0] if parse_model_name(name) is not None else name


# --- attribution maps -------------------------------------------------------------------------

GRADIENT = "gradient"  # the saliency map of the paper: the predicted logit's input gradient
#: every attribution map the saliency stage can compute (Captum beyond the gradient)
ATTRIBUTIONS = (GRADIENT, "smoothgrad", "integrated_gradients")
#: how figures and tables name each map
ATTRIBUTION_LABELS = {GRADIENT: "gradient", "smoothgrad": "SmoothGrad", "integrated_gradients": "IG"}

# --- statistics -------------------------------------------------------------------------------

#: a model's median over images and its CI (summary variables ``<quantity>_<statistic>``)
MODEL_STATISTICS = ("median", "median_ci_low", "median_ci_high")
#: a grid point's mean over seeds of the per-model medians and its CI
GRID_STATISTICS = ("mean_median", "mean_median_ci_low", "mean_median_ci_high")
#: the image subsets every statistic is given for
SUBSETS = ("all", "correct")

# --- a model directory (models/<model>/) ------------------------------------------------------

CHECKPOINT = "model.pt"
SPEC = "spec.json"
TRAINING_LOG = "training_log.csv"
PERFORMANCE = "test_accuracy.json"
MACHINE = "machine.json"
