# Config validation, the model grid, stage versions, and input functions. Parsing imports no
# torch, Foolbox or plotting library: every invocation, and every cluster job, parses this.
import re
import sys

from snakemake.exceptions import WorkflowError
from saliency_robustness.config import DATASET_CLASSES, validate_config
from saliency_robustness.errors import PipelineError
from saliency_robustness.figure_list import QUALITY_FIGURES, figures_for
from saliency_robustness.fingerprints import (
    checked_once,
    code_fingerprint,
    external_weights_hash,
    fingerprint,
    module_closure,
    package_versions,
    stage_modules,
)
from saliency_robustness.grid import external_models, fine_tunes_base, model_grid, model_train_settings, pretrain_settings, train_methods
from saliency_robustness.job_environment import export_package_path
from saliency_robustness.vocabulary import BASE, BASE_MODEL, EXTERNAL, GRADNORM, GRID_MODEL_PATTERN, MODEL_NAME_PATTERN


def check_attacks(ensemble, num_classes):
    """Build every attack of the ensemble (imports torch and Foolbox: seconds)."""
    from saliency_robustness.ensemble import check_ensemble

    check_ensemble(ensemble, num_classes)


try:
    _validated = validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
    GRID = model_grid(_validated)  # trained models: name -> (method, strength, seed)
    EXTERNAL_MODELS = external_models(_validated)  # models.external: name -> entry
    # what an external model is: the content of its weights, not where they lie or when they changed
    WEIGHTS_SHA256 = {name: external_weights_hash(entry, _validated["data_root"]) for name, entry in EXTERNAL_MODELS.items()}
    if workflow.is_main_process:  # once per run, not in every (cluster) job
        # candidates checked against the class count of the built-in datasets (a folder's is
        # known once the data job has listed it); a verdict is kept per settings, checking
        # code and package versions, so that only a change pays for the imports again
        _ensemble, _classes = _validated["attacks"]["ensemble"], DATASET_CLASSES.get(_validated["dataset"]["kind"])
        checked_once(
            ".snakemake/saliency_robustness",
            "attack-ensemble",
            {
                "ensemble": _ensemble,
                "classes": _classes,
                "code": code_fingerprint(module_closure("ensemble")),
                "packages": package_versions("foolbox", "torch", "numba"),
            },
            lambda: check_attacks(_ensemble, _classes),
        )
except PipelineError as error:
    sys.exit(f"error: {error}")
config.clear()
config.update(_validated)

export_package_path()  # jobs import this checkout's package, wherever they run

ENV = "../../envs/pipeline.yaml"
RESULTS = f"results/{config['experiment']}"
LOGS = f"{RESULTS}/logs"


# train.init base: every grid model fine-tunes one base model (rule pretrain), analysed with them
BASE_INIT = fine_tunes_base(config)
MODELS = [*([BASE_MODEL] if BASE_INIT else []), *GRID, *EXTERNAL_MODELS]  # every model the stages after training analyse
# an external model's name, literally (never matches when there is none)
EXTERNAL_NAME_PATTERN = "|".join(re.escape(name) for name in EXTERNAL_MODELS) or "(?!)"

ATTACKS = config["attacks"]["ensemble"]  # name -> {attack, kwargs, refine}
ATTACK_NAMES = sorted(ATTACKS)  # sorted: the config's key order must not look like a change
BASE_ATTACKS = [name for name in ATTACK_NAMES if not ATTACKS[name]["refine"]]
QUALITY_ENABLED = config["quality"]["enabled"]  # explanation-quality measures and their concordance
# what the quality stage computes (switching it on or off is not a change of its stores)
QUALITY = {k: v for k, v in config["quality"].items() if k != "enabled"}
FIGURES = figures_for([*train_methods(config["train"]), *([EXTERNAL] if EXTERNAL_MODELS else [])], quality=QUALITY_ENABLED)


wildcard_constraints:
    model=f"{MODEL_NAME_PATTERN}|{EXTERNAL_NAME_PATTERN}",
    attack="[A-Za-z0-9_]+",
    figure="|".join(FIGURES),


def canonical(value):
    """Dicts with sorted keys, recursively: Snakemake compares params by their text, so
    reordering keys in a config file must not look like a change."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def stage_version(script, **config_subset):
    """Hash of the package code that a stage's script runs (its imports, transitively) and of
    its config subset, passed as a param so that exactly the changed stages rerun."""
    return fingerprint({"code": code_fingerprint(stage_modules(script)), "config": config_subset})


def dataset_identity():
    """The dataset keys that change which images a model trains on (not where they live)."""
    return {k: v for k, v in config["dataset"].items() if k not in ("n_eval", "eval_seed")}


def model_dir(model):
    return f"{RESULTS}/models/{model}"


# train.vectorized: the gradnorm models of the grid train in one job (rule train_vectorized)
VECTORIZED = [m for m, point in GRID.items() if point.method == GRADNORM] if config["train"]["vectorized"] else []
# the models the per-model train rule makes
TRAIN_PATTERN = (
    "|".join(re.escape(m) for m in GRID if m not in VECTORIZED) or "(?!)" if VECTORIZED else GRID_MODEL_PATTERN
)


def train_settings(wildcards):
    return model_settings(wildcards.model)


def model_settings(model):
    """What grid model ``model`` is; with train.init base, the base's settings are part of it
    (a new base recipe retrains the grid; a fine-tune setting leaves the base as it is)."""
    point = GRID[model]
    return canonical({
        "name": model,
        "method": point.method,
        "strength": point.strength,
        "dataset": dataset_identity(),
        "model": config["model"],
        "train": model_train_settings(config["train"], point),
        "base": base_settings() if BASE_INIT else None,
    })


def base_settings():
    """What the base model is: the pretrain recipe on the model section (strength 0)."""
    return canonical({
        "name": BASE_MODEL,
        "method": BASE,
        "strength": 0.0,
        "dataset": dataset_identity(),
        "model": config["model"],
        "train": pretrain_settings(config),
    })


def train_inputs(wildcards):
    """A fine-tune reads the base model's directory (train.init base); else nothing."""
    return {"base": model_dir(BASE_MODEL)} if BASE_INIT else {}


def pretrain_threads() -> int:
    """The pretrain job runs alone at the start of the DAG, so it may take every core of the
    run. pretrain.threads overrides. A cluster run (--executor slurm --jobs N) has no core
    count: there the job is sized like any training job (1) unless pretrain.threads or
    --set-threads pretrain=N says more."""
    if config["pretrain"]["threads"]:
        return config["pretrain"]["threads"]
    try:
        return workflow.cores
    except WorkflowError:  # no --cores: a cluster executor
        return 1


def resume_file(wildcards):
    """Per-epoch training state; outside the model's output so that a rerun can resume."""
    return f"{RESULTS}/models/.resume/{wildcards.model}.pt"


def train_version(wildcards):
    return stage_version("train", **train_settings(wildcards))


def external_settings(wildcards):
    """What an external model is: its entry without where its files lie (the job reads those
    from the config) and without its attributes (labels: only the summary reads them)."""
    entry = {k: v for k, v in EXTERNAL_MODELS[wildcards.model].items() if k not in ("weights", "attributes")}
    if "robustbench" in entry:
        entry["robustbench"] = {k: v for k, v in entry["robustbench"].items() if k != "model_dir"}
    return canonical({**entry, "weights_sha256": WEIGHTS_SHA256[wildcards.model], "dataset": dataset_identity()})


def external_version(wildcards):
    return stage_version("external", **external_settings(wildcards))


def model_attributes():
    """The external models' free-form attributes, for the summary's coordinates."""
    return canonical({name: entry["attributes"] for name, entry in EXTERNAL_MODELS.items()})


EVAL_STORE = f"{RESULTS}/data/eval.zarr"


def saliency_store(model):
    return f"{RESULTS}/saliency/{model}.zarr"


def attack_store(model, attack):
    return f"{RESULTS}/attacks/{model}/{attack}.zarr"


def quality_store(model):
    return f"{RESULTS}/quality/{model}.zarr"


def metrics_store(model):
    return f"{RESULTS}/metrics/{model}.zarr"


def attack_inputs(wildcards):
    """A refining attack (Brendel-Bethge) starts from the other attacks' verified adversarials."""
    inputs = {"model": model_dir(wildcards.model), "eval": EVAL_STORE}
    if ATTACKS[wildcards.attack]["refine"]:
        inputs["starts"] = [attack_store(wildcards.model, a) for a in BASE_ATTACKS]
    return inputs


def attack_settings(wildcards):
    return canonical({
        "name": wildcards.attack,
        **ATTACKS[wildcards.attack],
        "batch_size": config["attacks"]["batch_size"],
        "store_adversarials": config["attacks"]["store_adversarials"],
    })


def attack_version(wildcards):
    return stage_version("attack", **attack_settings(wildcards))


def metrics_inputs(wildcards):
    return {
        "model": model_dir(wildcards.model),
        "eval": EVAL_STORE,
        "saliency": saliency_store(wildcards.model),
        "attacks": [attack_store(wildcards.model, a) for a in ATTACK_NAMES],
    }


def summary_inputs(wildcards):
    return {
        "metrics": [metrics_store(m) for m in MODELS],
        "models": [model_dir(m) for m in MODELS],
    }


def figure_inputs(wildcards):
    inputs = {
        "summary": f"{RESULTS}/summary.zarr",
        "eval": EVAL_STORE,
        "saliency": [saliency_store(m) for m in MODELS],
    }
    if wildcards.figure in QUALITY_FIGURES:
        inputs["concordance"] = f"{RESULTS}/concordance.zarr"
    return inputs


def final_targets():
    return (
        [EVAL_STORE, f"{RESULTS}/summary.csv"]
        + [model_dir(m) for m in MODELS]
        + [metrics_store(m) for m in MODELS]
        + expand(f"{RESULTS}/figures/{{figure}}.{{ext}}", figure=FIGURES, ext=["png", "pdf"])
        + ([f"{RESULTS}/summary_concordance.csv"] if QUALITY_ENABLED else [])
    )
