# Config validation, the model grid, stage versions, and input functions.
import sys

from saliency_robustness.config import code_fingerprint, fingerprint, model_grid, validate_config
from saliency_robustness.errors import ConfigError
from saliency_robustness.runtime import export_package_path

try:
    _validated = validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
    MODELS = model_grid(_validated)
except ConfigError as error:
    sys.exit(f"error: {error}")
config.clear()
config.update(_validated)

export_package_path()

ENV = "../../envs/pipeline.yaml"
RESULTS = f"results/{config['experiment']}"
LOGS = f"{RESULTS}/logs"


wildcard_constraints:
    model="gradnorm-lambda[0-9.e+-]+",


# package modules each stage runs; their source is part of the stage's version
STAGE_MODULES = {
    "data": ["data", "stores"],
    "train": ["training", "models", "data", "stores"],
}


def stage_version(stage, **config_subset):
    """Hash of a stage's code and config subset, passed as a param so changes rerun it."""
    return fingerprint({"code": code_fingerprint(STAGE_MODULES[stage]), "config": config_subset})


def dataset_identity():
    """The dataset keys that change which images a model trains on (not where they live)."""
    return {k: v for k, v in config["dataset"].items() if k not in ("n_eval", "eval_seed")}


def model_dir(model):
    return f"{RESULTS}/models/{model}"


def train_settings(wildcards):
    return {
        "name": wildcards.model,
        "lam": MODELS[wildcards.model],
        "dataset": dataset_identity(),
        "model": config["model"],
        "train": {k: v for k, v in config["train"].items() if k != "lambdas"},
    }


def resume_file(wildcards):
    """Per-epoch training state; outside the model's output so that a rerun can resume."""
    return f"{RESULTS}/models/.resume/{wildcards.model}.pt"


def train_version(wildcards):
    return stage_version("train", **train_settings(wildcards))


def final_targets():
    return [f"{RESULTS}/data/eval.zarr"] + [model_dir(m) for m in MODELS]
