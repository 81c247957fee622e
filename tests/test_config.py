"""Config validation: defaults, one-line errors naming the key, the model grid."""

from __future__ import annotations

import pytest
import yaml

from saliency_robustness.config import model_grid, model_name, validate_config
from saliency_robustness.errors import ConfigError

from conftest import REPO

CONFIGS = sorted((REPO / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_are_valid(path) -> None:  # noqa: ANN001
    config = validate_config(yaml.safe_load(path.read_text()))
    assert model_grid(config)


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
    ],
)
def test_bad_config_is_rejected_in_one_line_naming_the_key(config: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_model_names_are_readable_and_unique() -> None:
    assert model_name(0.1) == "gradnorm-lambda0.1"
    assert model_name(0.0) == "gradnorm-lambda0"
    config = validate_config({"experiment": "x", "train": {"lambdas": [0, 1e-3, 0.001]}})
    with pytest.raises(ConfigError, match="appears twice"):
        model_grid(config)
