"""Two routes to robustness and several attribution maps in one summary (docs/spec.md §3, §6):
models stacked by method and strength, each method's gains over its own smallest strength,
per-method trends, per-attribution alignment, and every figure drawn from such a summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from scipy.stats import spearmanr

from conftest import assert_within, float_tolerance, source_attrs, write_summary
from saliency_robustness.config import validate_config
from saliency_robustness.data import MNIST_INPUT_SPACE, eval_dataset
from saliency_robustness.errors import ConfigError
from saliency_robustness.models import ModelSpec, save_machine
from saliency_robustness.statistics import BootstrapOptions
from saliency_robustness.stores import write_store
from saliency_robustness.vocabulary import ADVERSARIAL, GRADIENT, GRADNORM, MODEL_NAME_PATTERN, grid_point_name, model_name

N = 24
OPTIONS = BootstrapOptions(n_resamples=300, confidence_level=0.95, seed=0)
GRID = [(GRADNORM, 0.0), (GRADNORM, 1.0), (ADVERSARIAL, 0.5), (ADVERSARIAL, 2.0)]
SEEDS = [0, 1]
ATTRIBUTIONS = [GRADIENT, "smoothgrad", "integrated_gradients"]


def fake_metrics(method: str, strength: float, i: int) -> xr.Dataset:
    rng = np.random.default_rng(i)
    robustness = rng.gamma(2.0, 0.5 + (strength if method == GRADNORM else 0.5 * strength), N)
    alignment = 0.5 * robustness + rng.normal(0, 0.05, N)
    per_image = {q: rng.uniform(0.1, 1.0, N) for q in (
        "alignment_cosine", "linearized_robustness", "homogeneity", "homogeneous_term", "bias_term_signed",
        "bound_angle_term", "bound_bias_term")}  # fmt: skip
    per_image["edge_correlation"] = np.random.default_rng(1000 + i).uniform(0.1, 1.0, N)  # its own draws: the others stay as they were
    per_image |= {"alignment": alignment, "robustness": robustness, "correct": rng.uniform(size=N) < 0.8}
    ds = xr.Dataset({k: ("sample", v, {"long_name": k, "units": "1"}) for k, v in per_image.items()}, coords={"sample": np.arange(N)})
    scale = np.array([1.0, 0.8, 0.6])[None, :]  # smoothgrad and IG: proportional alignment, so trends keep their sign
    ds = ds.assign_coords(attribution=ATTRIBUTIONS)
    ds["attribution_alignment"] = (("sample", "attribution"), alignment[:, None] * scale, {"long_name": "alignment", "units": "L2"})
    ds["attribution_alignment_cosine"] = (("sample", "attribution"), alignment[:, None] * scale / 9, {"long_name": "cosine", "units": "1"})
    return ds


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("mixed")
    images = np.random.default_rng(0).random((N, 1, 8, 8)).astype(np.float32)
    eval_store = write_store(eval_dataset(images, np.arange(N) % 10, np.arange(N), MNIST_INPUT_SPACE), root / "eval.zarr")
    models, paths, dirs = [], [], []
    for i, ((method, strength), seed) in enumerate((p, s) for p in GRID for s in SEEDS):
        model = model_name(method, strength, seed)
        models.append(model)
        d = root / "models" / model
        d.mkdir(parents=True)
        spec = ModelSpec(name=model, architecture="mnist_cnn", method=method, strength=strength, sensitivity="loss", p=2.0, seed=seed,
                         num_classes=10, in_channels=1, image_size=28, training={"seed": seed})  # fmt: skip
        (d / "spec.json").write_text(spec.to_json())
        (d / "test_accuracy.json").write_text(json.dumps({"test_accuracy": 0.95, "majority_class_share": 0.12}))
        save_machine(d, {"id": "test-machine"})
        write_store(fake_metrics(method, strength, i).assign_attrs(source_attrs(d, eval_store)), root / "metrics" / f"{model}.zarr")
        paths.append(root / "metrics" / f"{model}.zarr")
        dirs.append(d)
        maps = np.random.default_rng(i).normal(size=(len(ATTRIBUTIONS), N, 1, 8, 8))
        saliency = xr.Dataset(
            {"saliency": (("sample", "channel", "y", "x"), maps[0]), "attribution_map": (("attribution", "sample", "channel", "y", "x"), maps)},
            coords={"attribution": ATTRIBUTIONS},
        )
        write_store(saliency.assign_attrs(source_attrs(d, eval_store)), root / "saliency" / f"{model}.zarr")
    write_summary(root, models, paths, dirs, OPTIONS)  # stacking must sort by method, then strength
    return root, models


def test_models_are_stacked_by_method_then_strength_with_lambda_only_for_gradnorm(mixed) -> None:  # noqa: ANN001
    root, models = mixed
    summary = xr.open_zarr(root / "summary.zarr")
    assert list(summary["model"].values) == models
    assert list(summary["method"].values) == [m for m, _ in GRID for _ in SEEDS]
    np.testing.assert_array_equal(summary["strength"].values, [s for _, s in GRID for _ in SEEDS])
    lam = summary["lam"].values
    assert np.isnan(lam[summary["method"].values == ADVERSARIAL]).all() and list(lam[:4]) == [0, 0, 1, 1]
    assert list(summary["grid_method"].values) == [m for m, _ in GRID]
    assert list(summary["setting"].values) == [grid_point_name(m) for m in models]
    assert list(summary["grid_point"].values) == [grid_point_name(model_name(m, s, 0)) for m, s in GRID]


def test_each_attribution_map_is_a_summarised_quantity(mixed) -> None:  # noqa: ANN001
    root, models = mixed
    summary = xr.open_zarr(root / "summary.zarr")
    quantities = list(summary["quantity"].values)
    for a in ATTRIBUTIONS[1:]:
        assert f"alignment_{a}" in quantities and f"alignment_cosine_{a}" in quantities
    metrics = xr.open_zarr(root / "metrics" / f"{models[0]}.zarr")
    expected = np.median(metrics["attribution_alignment"].sel(attribution="smoothgrad").values)
    median = float(summary["model_median"].sel(model=models[0], subset="all", quantity="alignment_smoothgrad"))
    assert_within(median, expected, float_tolerance(np.float64, expected, terms=2))  # the mean of the two middle values


def test_gains_are_over_each_methods_own_smallest_strength(mixed) -> None:  # noqa: ANN001
    root, models = mixed
    summary = xr.open_zarr(root / "summary.zarr").sel(subset="all", quantity="robustness")
    gain, mean = summary["grid_gain"].values, summary["grid_mean_median"].values
    assert np.isnan(gain[0]) and np.isnan(gain[2])  # each method's baseline
    # one float64 subtraction of the stored means (perhaps of their unstored values, which are the same float64)
    assert_within(gain[1], mean[1] - mean[0], float_tolerance(np.float64, mean[1], mean[0]))
    assert_within(gain[3], mean[3] - mean[2], float_tolerance(np.float64, mean[3], mean[2]))  # PGD against PGD, not against lambda = 0


def test_trends_per_method_use_only_that_methods_models(mixed) -> None:  # noqa: ANN001
    root, models = mixed
    summary = xr.open_zarr(root / "summary.zarr").sel(subset="all")
    trends = list(summary["trend"].values)
    assert trends[:3] == ["median alignment ~ median robustness", "lambda ~ median robustness", "lambda ~ median alignment"]
    assert {"epsilon ~ median robustness", "adversarial: median alignment ~ median robustness",
            "median alignment_smoothgrad ~ median robustness"} <= set(trends)  # fmt: skip
    pgd = summary["method"].values == ADVERSARIAL
    medians = summary["model_median"].sel(quantity="robustness").values[pgd]
    expected = spearmanr(summary["strength"].values[pgd], medians).statistic
    # Pearson's correlation of ranks (sums of small integers, exact) from a few float64 operations at magnitude <= 1
    assert_within(
        float(summary["trend_spearman"].sel(trend="epsilon ~ median robustness")), expected, float_tolerance(np.float64, 1.0, terms=pgd.sum())
    )
    assert int(summary["trend_points"].sel(trend="epsilon ~ median robustness")) == pgd.sum() == 4
    assert int(summary["trend_points"].sel(trend="median alignment ~ median robustness")) == len(models)




def test_model_names_say_the_method_and_match_the_wildcard() -> None:
    import re

    assert model_name(ADVERSARIAL, 1.5, 0) == "pgd-eps1.5-seed0" and model_name(GRADNORM, 0.3, 2) == "gradnorm-lambda0.3-seed2"
    assert all(re.fullmatch(MODEL_NAME_PATTERN, n) for n in ("pgd-eps1.5-seed0", "gradnorm-lambda1e-05-seed3"))
    with pytest.raises(ConfigError, match="train.adversarial.epsilons"):
        from saliency_robustness.grid import model_grid

        model_grid(validate_config({"experiment": "x", "train": {"method": "adversarial"}}))
