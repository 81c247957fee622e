"""Config validation: defaults, one-line errors naming the key, the model grid."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from conftest import REPO
from saliency_robustness.config import validate_config
from saliency_robustness.errors import ConfigError
from saliency_robustness.fingerprints import code_fingerprint, stage_modules
from saliency_robustness.grid import GridPoint, external_models, model_grid
from saliency_robustness.vocabulary import MODEL_NAME_PATTERN, grid_point_name, model_name, parse_model_name

CONFIGS = sorted((REPO / "config").glob("*.yaml"))
OVERLAY_PREFIX = "with-"  # config/with-*.yaml: overlays, given after an experiment's own config file


def merged(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``, section by section, as Snakemake merges several --configfile."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path) -> None:  # noqa: ANN001
    raw = yaml.safe_load(path.read_text())
    if path.name.startswith(OVERLAY_PREFIX):
        raw = merged(yaml.safe_load((REPO / "config" / "config.yaml").read_text()), raw)
    config = validate_config(raw)
    assert model_grid(config) or external_models(config)


def test_the_quality_overlay_switches_only_the_quality_measures_on() -> None:
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    with_quality = validate_config(merged(base, yaml.safe_load((REPO / "config" / "with-quality.yaml").read_text())))
    without = validate_config(base)
    assert with_quality["quality"]["enabled"] and not without["quality"]["enabled"]
    assert {k: v for k, v in with_quality.items() if k != "quality"} == {k: v for k, v in without.items() if k != "quality"}


def test_defaults_are_filled_in_nested_sections() -> None:
    config = validate_config({"experiment": "x"})
    assert config["train"]["sensitivity"] == "loss"
    assert config["dataset"]["n_eval"] == 1000
    assert config["attacks"]["store_adversarials"] is True


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"experiment": "x", "trian": {}}, "unknown config key 'trian'"),
        ({"experiment": "x", "train": {"lamdas": [0]}}, "unknown config key 'train.lamdas'"),
        ({"experiment": "x", "train": {"lambdas": [0, -0.1]}}, "config key 'train.lambdas.1': -0.1 is less than the minimum of 0"),
        ({"experiment": "x", "train": {"epochs": "3"}}, "config key 'train.epochs': '3' is not of type 'integer'"),
        ({"experiment": "x", "train": {"sensitivity": "margin"}}, "config key 'train.sensitivity'"),
        ({"experiment": "x", "dataset": {"n_eval": 0}}, "config key 'dataset.n_eval'"),
        ({"train": {}}, "missing config key 'experiment'"),
        (
            {"experiment": "x", "attacks": {"store_adversarials": False, "ensemble": {"f": {"attack": "L2FMNAttack", "refine": True}}}},
            "config key 'attacks.store_adversarials'",
        ),
        ({"experiment": "x", "attacks": {"ensemble": {"df": {"kwargs": {}}}}}, "missing config key 'attacks.ensemble.df.attack'"),
        ({"experiment": "x", "quality": {"road": {"fractions": [0.5, 0.2]}}}, "config key 'quality.road.fractions': [0.5, 0.2] must increase"),
        ({"experiment": "x", "quality": {"road": {"fractions": [0.5, 1.0]}}}, "config key 'quality.road.fractions.1'"),
        ({"experiment": "x", "quality": {"max_sensitivity": {"radius": 0}}}, "config key 'quality.max_sensitivity.radius'"),
        ({"experiment": "x", "quality": {"enabled": "true"}}, "config key 'quality.enabled'"),
    ],
)
def test_bad_config_is_rejected_in_one_line_naming_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_model_names_are_readable_and_unique() -> None:
    assert model_name("gradnorm", 0.1, 0) == "gradnorm-lambda0.1-seed0"
    assert model_name("gradnorm", 0.0, 3) == "gradnorm-lambda0-seed3"
    assert model_name("gradnorm", -0.0, 0) == model_name("gradnorm", 0.0, 0)
    assert model_name("gradnorm", 10.0, 0) == "gradnorm-lambda10-seed0"
    assert model_name("gradnorm", 1.0000001, 0) != model_name("gradnorm", 1.0, 0)  # distinct values, distinct names
    assert re.fullmatch(MODEL_NAME_PATTERN, model_name("gradnorm", 1e-5, 12))
    # a name reads back as what made it; its grid point is the name without the seed
    for method, strength, seed in (("gradnorm", 1e-5, 12), ("adversarial", 1.5, 0), ("gradnorm", 0.0, 3)):
        name = model_name(method, strength, seed)
        assert parse_model_name(name) == (method, strength, seed)
        assert grid_point_name(name) == name.removesuffix(f"-seed{seed}")
    assert parse_model_name("resnet50-robust") is None and grid_point_name("resnet50-robust") == "resnet50-robust"
    config = validate_config({"experiment": "x", "train": {"lambdas": [0, 1e-3, 0.001]}})
    with pytest.raises(ConfigError, match="appears twice"):
        model_grid(config)
    config = validate_config({"experiment": "x", "train": {"lambdas": [0.0, -0.0]}})
    with pytest.raises(ConfigError, match="appears twice"):
        model_grid(config)


def test_seeds_make_the_grid_lambda_by_seed() -> None:
    config = validate_config({"experiment": "x", "train": {"lambdas": [0, 0.5], "seeds": [0, 4]}})
    grid = model_grid(config)
    assert list(grid) == ["gradnorm-lambda0-seed0", "gradnorm-lambda0-seed4", "gradnorm-lambda0.5-seed0", "gradnorm-lambda0.5-seed4"]
    assert grid["gradnorm-lambda0.5-seed4"] == GridPoint(method="gradnorm", strength=0.5, seed=4)
    # a single-seed config keeps working: seed is short for seeds: [seed]
    assert list(model_grid(validate_config({"experiment": "x", "train": {"lambdas": [0.1], "seed": 2}}))) == ["gradnorm-lambda0.1-seed2"]
    with pytest.raises(ConfigError, match="appears twice"):
        model_grid(validate_config({"experiment": "x", "train": {"seeds": [1, 1]}}))
    with pytest.raises(ConfigError, match="'train.seed': 5 is not among train.seeds") as info:
        validate_config({"experiment": "x", "train": {"seed": 5, "seeds": [1, 2]}})
    assert "\n" not in str(info.value)
    validated = validate_config({"experiment": "x", "train": {"seeds": [3, 4]}})
    assert validate_config(validated) == validated  # validating twice changes nothing


def test_stage_fingerprints_follow_the_imports_of_each_stage(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The modules a stage runs are derived from its script's imports: an edit to the saliency
    stage reruns no attack, an edit to the Foolbox fixes reruns no training and no saliency, and
    the metrics, which combine attack results, depend on that combination but not on how
    attacks run."""
    from saliency_robustness import fingerprints as config_module

    assert {"stages.attacks", "ensemble", "foolbox_fixes", "robustness"} <= stage_modules("attack")
    assert "stages.saliency" not in stage_modules("attack")
    assert not {"ensemble", "foolbox_fixes"} & (stage_modules("train") | stage_modules("saliency") | stage_modules("metrics"))
    assert {"stages.metrics", "evaluation", "robustness", "models"} <= stage_modules("metrics")
    copy = tmp_path / "saliency_robustness"
    shutil.copytree(config_module.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    stages = ("attack", "train", "saliency", "metrics")
    before = {stage: code_fingerprint(stage_modules(stage)) for stage in stages}
    monkeypatch.setattr(config_module, "PACKAGE_DIR", copy)
    assert {stage: code_fingerprint(stage_modules(stage)) for stage in stages} == before

    def changed_by_editing(module: str) -> set[str]:
        previous = {stage: code_fingerprint(stage_modules(stage)) for stage in stages}
        path = copy.joinpath(*module.split(".")).with_suffix(".py")
        path.write_text(path.read_text() + "\n# an edit\n")
        return {stage for stage in stages if code_fingerprint(stage_modules(stage)) != previous[stage]}

    assert changed_by_editing("stages.saliency") == {"saliency"}
    assert changed_by_editing("foolbox_fixes") == {"attack"}
    assert changed_by_editing("robustness") == {"attack", "metrics"}
    assert changed_by_editing("evaluation") == {"saliency", "metrics"}


def test_decoding_once_with_loader_workers_is_refused_in_one_line() -> None:
    """Workers would each decode into a copy of the cache and lose it after every epoch."""
    config = {"experiment": "x", "dataset": {"kind": "imagefolder", "path": "f", "decode": "once"}, "train": {"num_workers": 2}}
    with pytest.raises(ConfigError, match=r"^config key 'dataset.decode': once keeps .* set train.num_workers to 0 \(it is 2\) or decode per_epoch$"):
        validate_config(config)
    assert validate_config({**config, "train": {"num_workers": 0}})["dataset"]["decode"] == "once"


def test_a_renamed_key_is_refused_with_its_new_name() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train.ensemble' is now called 'train.vectorized'$"):
        validate_config({"experiment": "x", "train": {"ensemble": True}})
    assert validate_config({"experiment": "x", "train": {"vectorized": True}})["train"]["vectorized"] is True
