"""The explanation-quality stage and the concordance of model rankings (issue 23): what the stores hold, that
the stage's numbers are the measures' own, that every map of an image sees the same perturbations, and Kendall's
tau with its intervals against known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.stats import kendalltau
from torch import nn

from conftest import assert_within, float_tolerance
from saliency_robustness.attributions import AttributionOptions
from saliency_robustness.data import MNIST_INPUT_SPACE
from saliency_robustness.errors import StoreError
from saliency_robustness.explanation_quality import QUALITY_MEASURES, QUALITY_SCORES, gini, infidelity, road
from saliency_robustness.stages.concordance import RANKINGS, concordance, concordance_table, quality_table, stack_quality
from saliency_robustness.stages.quality import QualityOptions, compute_quality
from saliency_robustness.statistics import BootstrapOptions, kendall_tau
from saliency_robustness.stores import write_store
from saliency_robustness.vocabulary import SUBSETS

OPTIONS = QualityOptions(
    batch_size=3,
    seed=5,
    fractions=(0.2, 0.5, 0.8),
    road_noise_std=0.01,
    sensitivity_radius=0.05,
    sensitivity_samples=3,
    infidelity_std=0.1,
    infidelity_perturbations=4,
    infidelity_normalize=True,
)
ATTRIBUTIONS = AttributionOptions(("smoothgrad",), {"n": 4, "sigma": 0.1}, {"baseline": "zero", "steps": 8})
BOOTSTRAP = BootstrapOptions(n_resamples=200, confidence_level=0.9, seed=0)


def linear_model(n_inputs: int, n_classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_inputs, n_classes, dtype=torch.float64)).eval()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, dtype=torch.float64), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3, dtype=torch.float64)
    ).eval()


def images_and_gradients(model: nn.Module, n: int = 7) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    x = torch.rand(n, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inputs = x.clone().requires_grad_(True)
    logits = model(inputs)
    prediction = logits.argmax(dim=1)
    (gradient,) = torch.autograd.grad(logits.gather(1, prediction[:, None]).sum(), inputs)
    return x, gradient.numpy(), prediction.numpy()


def test_the_stage_stores_the_measures_own_numbers_with_units() -> None:
    model = small_cnn()
    x, g, prediction = images_and_gradients(model)
    ds, seconds = compute_quality(
        model, x, g[None], prediction, methods=["gradient"], options=OPTIONS, attributions=ATTRIBUTIONS, space=MNIST_INPUT_SPACE, device="cpu"
    )
    assert set(ds.data_vars) == set(QUALITY_MEASURES)
    assert ds["road_morf"].dims == ("attribution", "sample", "fraction") and ds["gini"].dims == ("attribution", "sample")
    assert list(ds["fraction"].values) == list(OPTIONS.fractions)
    for name, (long_name, units) in QUALITY_MEASURES.items():
        assert ds[name].attrs == {"long_name": long_name, "units": units}
    a, target = torch.as_tensor(g), torch.as_tensor(prediction)
    np.testing.assert_array_equal(ds["gini"].values[0], gini(a).numpy())
    # batched by 3 with seed 5 + the batch's first image: the measures' own numbers, batch by batch
    for start in range(0, len(x), 3):
        rows = slice(start, start + 3)
        curves = road(model, x[rows], target[rows], a[rows], fractions=OPTIONS.fractions, noise_std=0.01, seed=5 + start)
        np.testing.assert_array_equal(ds["road_area"].values[0, rows], curves.area_between.numpy())
        np.testing.assert_array_equal(ds["road_morf"].values[0, rows], curves.morf.numpy())
        expected = infidelity(model, x[rows], target[rows], a[rows], n_perturbations=4, std=0.1, seed=5 + start, normalize=True)
        np.testing.assert_array_equal(ds["infidelity"].values[0, rows], expected.numpy())
    assert set(seconds) == {"gini", "road", "max_sensitivity", "infidelity"} and all(s["gradient"] >= 0 for s in seconds.values())


def test_every_map_of_an_image_sees_the_same_perturbations() -> None:
    """Two methods with the same map get the same Gini, ROAD and infidelity: the draws are per image, not per map."""
    model = small_cnn(1)
    x, g, prediction = images_and_gradients(model)
    ds, _ = compute_quality(
        model,
        x,
        np.stack([g, g]),
        prediction,
        methods=["gradient", "smoothgrad"],
        options=OPTIONS,
        attributions=ATTRIBUTIONS,
        space=MNIST_INPUT_SPACE,
        device="cpu",
    )
    for name in ("gini", "road_morf", "road_lerf", "road_area", "infidelity"):
        np.testing.assert_array_equal(ds[name].values[0], ds[name].values[1], err_msg=name)
    assert np.isfinite(ds["max_sensitivity"].values).all()


def test_a_linear_models_gradient_and_smoothgrad_do_not_move_under_perturbation() -> None:
    """The gradient and SmoothGrad of a linear model are its weight row everywhere: max-sensitivity 0. Integrated
    Gradients from zero is ``x * w``, which moves with ``x``: not 0."""
    model = linear_model(36)
    x, g, prediction = images_and_gradients(model)
    options = AttributionOptions(("smoothgrad", "integrated_gradients"), {"n": 4, "sigma": 0.1}, {"baseline": "zero", "steps": 8})
    maps = np.stack([g, g, x.numpy() * g])
    ds, _ = compute_quality(
        model,
        x,
        maps,
        prediction,
        methods=["gradient", "smoothgrad", "integrated_gradients"],
        options=OPTIONS,
        attributions=options,
        space=MNIST_INPUT_SPACE,
        device="cpu",
    )
    sensitivity = ds["max_sensitivity"]
    assert (sensitivity.sel(attribution="gradient").values == 0).all()  # the weight row, bit for bit
    # SmoothGrad: the mean of n copies of the row, each entry rounded relative to itself, twice (at x and x + d)
    assert_within(sensitivity.sel(attribution="smoothgrad").values, 0.0, float_tolerance(np.float64, 1.0, terms=options.smoothgrad["n"] + 1))
    assert (sensitivity.sel(attribution="integrated_gradients").values > 1e-3).all()


def test_maps_of_another_shape_are_refused() -> None:
    model = small_cnn()
    x, g, prediction = images_and_gradients(model)
    with pytest.raises(ValueError, match="need maps"):
        compute_quality(model, x, g, prediction, methods=["gradient"], options=OPTIONS, attributions=ATTRIBUTIONS, space=MNIST_INPUT_SPACE)


# --- Kendall's tau and the concordance -----------------------------------------------------------


def test_kendall_tau_is_scipys_tau_b_also_with_ties() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        x, y = rng.integers(0, 4, 9).astype(float), rng.normal(size=9)
        y[:3] = y[3]  # ties in both
        assert kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)
    assert kendall_tau(np.arange(5.0), np.arange(5.0) ** 3) == 1.0
    assert kendall_tau(np.arange(5.0), -np.arange(5.0)) == -1.0
    assert np.isnan(kendall_tau(np.ones(5), np.arange(5.0)))
    assert np.isnan(kendall_tau(np.array([0.0, 1.0, np.nan]), np.arange(3.0)))
    assert kendall_tau(np.zeros((4, 6)), np.zeros((4, 6))).shape == (4,)


def synthetic(n_points: int = 4, seeds: int = 2, n: int = 60, degenerate: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """A summary and stacked quality scores whose per-model medians are known: model m's alignment is about
    ``m``, its robustness about ``2 m``, Gini about ``m`` (agrees), max-sensitivity about ``-m`` (lower is better:
    agrees), the ROAD area about ``(-1)^m`` (unrelated) and infidelity constant but for noise."""
    rng = np.random.default_rng(0)
    models = [f"gradnorm-lambda{p}-seed{s}" for p in range(n_points) for s in range(seeds)]
    level = np.array([p + 0.1 * s for p in range(n_points) for s in range(seeds)], dtype=float)
    noise = lambda: rng.normal(0, 0.01, (len(models), n))  # noqa: E731
    summary = xr.Dataset(
        {
            "alignment": (("model", "sample"), level[:, None] + noise()),
            "robustness": (("model", "sample"), 2 * level[:, None] + noise()),
            "in_subset": (("model", "sample", "subset"), np.ones((len(models), n, len(SUBSETS)), dtype=bool)),
            "degenerate": ("model", np.array([m == degenerate for m in models])),
            "setting": ("model", np.array([m.rsplit("-", 1)[0] for m in models], dtype=object)),
        },
        coords={"model": models, "sample": np.arange(n), "subset": list(SUBSETS)},
    )
    scores = {
        "gini": level[:, None] + noise(),
        "road_area": (-1.0) ** np.arange(len(models))[:, None] + noise(),
        "max_sensitivity": -level[:, None] + noise(),
        "infidelity": 1 + noise(),
    }
    quality = xr.Dataset(
        {k: (("model", "attribution", "sample"), v[:, None, :]) for k, v in scores.items()},
        coords={"model": models, "attribution": ["gradient"], "sample": np.arange(n)},
    )
    return summary, quality


def tau(ds: xr.Dataset, a: str, b: str, subset: str = "all") -> xr.Dataset:
    return ds.sel(subset=subset, attribution="gradient", ranking=a, ranking_other=b)


def test_rankings_that_agree_get_tau_one_and_the_rerun_interval() -> None:
    summary, quality = synthetic()
    ds = concordance(summary, quality, BOOTSTRAP)
    for a, b, expected in (("alignment", "robustness", 1.0), ("alignment", "gini", 1.0), ("alignment", "max_sensitivity", -1.0)):
        cell = tau(ds, a, b)
        assert float(cell["concordance_tau"]) == expected, (a, b)
        assert str(cell["concordance_interval"].values) == "rerun"
        assert float(cell["concordance_tau_ci_low"]) <= expected <= float(cell["concordance_tau_ci_high"])
        assert float(tau(ds, b, a)["concordance_tau"]) == expected  # symmetric
    # unrelated: the ROAD area alternates with the seed, whatever the alignment
    assert abs(float(tau(ds, "alignment", "road_area")["concordance_tau"])) < 0.5
    assert float(tau(ds, "gini", "gini")["concordance_tau"]) == 1.0
    assert int(ds["concordance_n_models"]) == 8 and list(ds["better"].values) == list(RANKINGS.values())


def test_per_model_medians_of_the_scores_carry_their_ci() -> None:
    summary, quality = synthetic()
    ds = concordance(summary, quality, BOOTSTRAP)
    median = ds["quality_median"].sel(subset="all", attribution="gradient", score="gini")
    np.testing.assert_allclose(median.values, np.median(quality["gini"].values[:, 0], axis=1))
    low, high = (ds[f"quality_median_ci_{end}"].sel(subset="all", attribution="gradient", score="gini").values for end in ("low", "high"))
    assert (low <= median.values).all() and (median.values <= high).all() and (high - low < 0.02).all()
    table = quality_table(ds)
    assert set(table.columns) == {"model", "subset", "attribution", "score", "median", "median_ci_low", "median_ci_high", "n_images"}
    assert len(table) == summary.sizes["model"] * len(SUBSETS) * len(QUALITY_SCORES)


def test_without_replicate_seeds_the_interval_is_over_images_and_degenerate_models_are_left_out() -> None:
    summary, quality = synthetic(n_points=5, seeds=1, degenerate="gradnorm-lambda4-seed0")
    ds = concordance(summary, quality, BOOTSTRAP)
    assert str(tau(ds, "alignment", "gini")["concordance_interval"].values) == "images only"
    assert int(ds["concordance_n_models"]) == 4
    table = concordance_table(ds)
    n_pairs = len(RANKINGS) * (len(RANKINGS) - 1) // 2
    assert len(table) == len(SUBSETS) * n_pairs and set(table["n_models"]) == {4}
    row = table[(table["ranking"] == "alignment") & (table["ranking_other"] == "max_sensitivity") & (table["subset"] == "all")].iloc[0]
    assert (row["kendall_tau"], row["ranking_other_better"]) == (-1.0, "lower")


def test_images_outside_the_subset_do_not_count() -> None:
    summary, quality = synthetic()
    summary["in_subset"].values[:, :30, 1] = False  # "correct": the first 30 images are out
    quality["gini"].values[:, 0, 30:] = quality["gini"].values[:, 0, 30:] * 0 + 7.0  # the 30 kept: Gini 7 exactly
    ds = concordance(summary, quality, BOOTSTRAP)
    assert (ds["quality_n_images"].sel(subset="correct").values == 30).all()
    assert (ds["quality_median"].sel(subset="correct", attribution="gradient", score="gini").values == 7.0).all()


def quality_store(path, model: str, prediction: np.ndarray, label: np.ndarray) -> None:  # noqa: ANN001
    n = len(prediction)
    ds = xr.Dataset(
        {name: (("attribution", "sample"), np.ones((1, n))) for name in QUALITY_SCORES}
        | {"prediction": ("sample", prediction), "label": ("sample", label)},
        coords={"attribution": ["gradient"], "sample": np.arange(n)},
        attrs={"computed_from": json.dumps({"model": model})},
    )
    write_store(ds, path)


def test_a_quality_store_of_other_predictions_or_images_is_refused(tmp_path) -> None:  # noqa: ANN001
    label = np.arange(6) % 3
    summary = xr.Dataset(
        {"prediction": (("model", "sample"), np.tile(label, (2, 1))), "label": (("model", "sample"), np.tile(label, (2, 1)))},
        coords={"model": ["a", "b"], "sample": np.arange(6)},
    )
    quality_store(tmp_path / "a.zarr", "a", label, label)
    quality_store(tmp_path / "b.zarr", "b", (label + 1) % 3, label)
    with pytest.raises(StoreError, match="other predictions than the summary's for model b"):
        stack_quality(summary, ["a", "b"], [tmp_path / "a.zarr", tmp_path / "b.zarr"])
    quality_store(tmp_path / "c.zarr", "b", label[:5], label[:5])
    with pytest.raises(StoreError, match="other evaluation images"):
        stack_quality(summary, ["a", "b"], [tmp_path / "a.zarr", tmp_path / "c.zarr"])
    with pytest.raises(StoreError, match="computed from model 'a'"):
        stack_quality(summary, ["b", "a"], [tmp_path / "a.zarr", tmp_path / "b.zarr"])
    stacked = stack_quality(summary, ["a"], [tmp_path / "a.zarr"])
    assert stacked["gini"].dims == ("model", "attribution", "sample")
