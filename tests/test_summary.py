"""The summary stage (stacking, statistics) and every figure, on synthetic metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
import xarray as xr
from scipy.stats import spearmanr

from conftest import source_attrs
from saliency_robustness.config import validate_config
from saliency_robustness.data import MNIST_INPUT_SPACE, eval_dataset
from saliency_robustness.errors import StoreError
from saliency_robustness.models import ModelSpec, degenerate_reason, read_test_accuracy, save_machine
from saliency_robustness.stages.summary import SUMMARISED, summarise, summary_stage
from saliency_robustness.statistics import (
    BootstrapOptions,
    finite_spearman,
    hierarchical_bootstrap,
    median_ci,
    rank_correlation,
    rerun_draws,
    seed_interval,
)
from saliency_robustness.stores import write_store
from saliency_robustness.vocabulary import BASE, BASE_MODEL, GRADNORM, SUBSETS, model_name

LAMBDAS = [0.0, 0.01, 0.1]
SEEDS = [0, 1]
N = 30
OPTIONS = BootstrapOptions(n_resamples=500, confidence_level=0.95, seed=0)
DEGENERATE = "gradnorm-lambda0.1-seed1"  # near-chance test accuracy


def fake_metrics(lam: float, seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    robustness = rng.gamma(2.0, 0.5 + 5 * lam, N)
    robustness[:2] = np.nan  # two attack failures
    alignment = 0.5 * np.nan_to_num(robustness) + rng.normal(0, 0.05, N)
    angle, bias = rng.uniform(0, 1, N), rng.uniform(-0.3, 0.3, N)
    homogeneous = robustness * 1.1 - bias
    per_image = {
        "alignment": alignment,
        "alignment_cosine": alignment / 9.0,
        "linearized_robustness": robustness * 1.1,
        "homogeneity": rng.uniform(0.2, 1.0, N),
        "homogeneous_term": homogeneous,
        "bias_term_signed": bias,
        "bound_angle_term": angle,
        "bound_bias_term": np.abs(bias),
        "bound_rhs": alignment + angle + np.abs(bias),
        "edge_correlation": rng.uniform(-0.2, 0.6, N),
        "robustness": robustness,
        "prediction": rng.integers(0, 10, N),
        "correct": rng.uniform(size=N) < 0.8,
    }
    return xr.Dataset(
        {k: ("sample", v, {"long_name": k, "units": "1"}) for k, v in per_image.items()},
        coords={"sample": np.arange(N)},
        attrs={"title": "metrics"},
    )


def name(lam: float, seed: int) -> str:
    return model_name(GRADNORM, lam, seed)


def write_fake_model(root, eval_store, model: str, method: str, strength: float, seed: int, metrics: xr.Dataset, accuracy: float,
                     share: float = 0.12):  # noqa: ANN001, ANN201
    """A model directory (spec, test accuracy, machine), its metrics and saliency stores."""
    d = root / "models" / model
    d.mkdir(parents=True)
    spec = ModelSpec(name=model, architecture="mnist_cnn", method=method, strength=strength, sensitivity="loss", p=2.0, seed=seed,
                     num_classes=10, in_channels=1, image_size=28, training={"seed": seed, "epochs": 1})  # fmt: skip
    (d / "spec.json").write_text(spec.to_json())
    (d / "test_accuracy.json").write_text(json.dumps({"test_accuracy": accuracy, "majority_class_share": share}))
    save_machine(d, {"id": f"machine-{'ab'[seed % 2]}", "cpu": f"cpu {'ab'[seed % 2]}"})
    write_store(metrics.assign_attrs(source_attrs(d, eval_store)), root / "metrics" / f"{model}.zarr")
    saliency = xr.Dataset({"saliency": (("sample", "channel", "y", "x"), np.random.default_rng(seed).normal(size=(N, 1, 8, 8)))})
    write_store(saliency.assign_attrs(source_attrs(d, eval_store)), root / "saliency" / f"{model}.zarr")
    return d, root / "metrics" / f"{model}.zarr"


def write_eval_store(root):  # noqa: ANN001, ANN201
    images = torch.rand(N, 1, 8, 8)
    return write_store(eval_dataset(images, torch.arange(N) % 10, np.arange(N), MNIST_INPUT_SPACE), root / "eval.zarr")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("exp")
    eval_store = write_eval_store(root)
    models, metrics_paths, model_dirs = [], [], []
    for i, (lam, seed) in enumerate((lam, seed) for lam in LAMBDAS for seed in SEEDS):
        model = name(lam, seed)
        models.append(model)
        degenerate = model == DEGENERATE
        d, metrics = write_fake_model(root, eval_store, model, GRADNORM, lam, seed, fake_metrics(lam, i), 0.1 if degenerate else 0.99 - lam,
                                      0.95 if degenerate else 0.12)  # fmt: skip
        metrics_paths.append(metrics)
        model_dirs.append(d)
    # listed in an order other than lambda's, to check the stacking sorts
    order = [5, 2, 0, 3, 1, 4]
    outputs = {key: root / f"{key}.csv" for key in ("summary", "summary_grid", "summary_trends")}
    summary_stage(
        models=[models[i] for i in order],
        metrics_stores=[metrics_paths[i] for i in order],
        model_dirs=[model_dirs[i] for i in order],
        output_zarr=root / "summary.zarr",
        output_csv=outputs["summary"],
        output_grid_csv=outputs["summary_grid"],
        output_trends_csv=outputs["summary_trends"],
        options=OPTIONS,
    )
    return root, models


def subset_values(lam: float, i: int, var: str, subset: str) -> np.ndarray:
    """A fake model's values of ``var`` on the images a subset's statistics use."""
    m = fake_metrics(lam, i)
    keep = np.all([np.isfinite(m[v].values) for v in SUMMARISED], axis=0)
    if subset == "correct":
        keep &= m["correct"].values
    return m[var].values[keep]


# --- bootstrap intervals with known answers ---


def test_bootstrap_options_are_the_config_summary_section() -> None:
    """Read key by key from the section (no defaults of their own), and from a validated
    config, whose schema fills the defaults in."""
    assert BootstrapOptions.from_config({"n_resamples": 123, "confidence_level": 0.9, "seed": 7}) == BootstrapOptions(123, 0.9, 7)
    section = validate_config({"experiment": "x"})["summary"]
    assert BootstrapOptions.from_config(section) == BootstrapOptions(**section)
    with pytest.raises(TypeError):
        BootstrapOptions(n_resamples=100)  # type: ignore[call-arg]


def test_finite_spearman_skips_non_finite_pairs_and_needs_three() -> None:
    x = np.array([1.0, 2.0, np.nan, 3.0, 4.0, np.inf])
    y = np.array([2.0, 1.0, 5.0, 4.0, 3.0, 0.0])
    ok = np.isfinite(x) & np.isfinite(y)
    assert finite_spearman(x, y) == spearmanr(x[ok], y[ok]).statistic
    assert np.isnan(finite_spearman(x[:2], y[:2]))  # two pairs
    assert np.isnan(finite_spearman(np.ones(5), y[:5]))  # constant


def test_median_ci_of_a_constant_sample_is_that_constant() -> None:
    assert median_ci(np.full(25, 3.5), OPTIONS) == (3.5, 3.5)


def test_median_ci_is_the_order_statistics_the_binomial_law_gives() -> None:
    """For x = 0..10 the bootstrap median is x_(k) with P(median* <= x_(k)) = P(Bin(11, k/11) >= 6):
    0.0072 at x_(2) and 0.0512 at x_(3), 0.9488 at x_(8) and 0.9928 at x_(9). The percentile
    95 % CI is therefore [x_(3), x_(9)] = [2, 8]."""
    low, high = median_ci(np.arange(11.0), BootstrapOptions(n_resamples=20000, confidence_level=0.95, seed=1))
    assert (low, high) == (2.0, 8.0)


def test_median_ci_is_reproducible_and_brackets_the_median() -> None:
    x = np.random.default_rng(3).normal(size=200)
    assert median_ci(x, OPTIONS) == median_ci(x, OPTIONS)
    low, high = median_ci(x, OPTIONS)
    assert low < np.median(x) < high


def mean_of_medians(medians: np.ndarray, picked: list[list[int]]) -> np.ndarray:
    return medians[picked[0]].mean(axis=0)


def test_hierarchical_bootstrap_without_spread_gives_a_point_interval() -> None:
    values = np.full((2, 1, 10), 2.0)
    values[1, 0, 7:] = np.nan  # not in the subset
    estimate, low, high = hierarchical_bootstrap(values, [[0, 1]], mean_of_medians, OPTIONS)
    assert estimate[0] == low[0] == high[0] == 2.0


def test_hierarchical_bootstrap_of_two_seeds_spans_their_medians() -> None:
    """With every image's value constant within a seed, only the seeds vary: the mean of two
    drawn seeds' medians is a, (a+b)/2 or b with probabilities 1/4, 1/2, 1/4, so the 95 % CI is [a, b]."""
    values = np.stack([np.full((1, 10), 1.0), np.full((1, 10), 3.0)])
    estimate, low, high = hierarchical_bootstrap(values, [[0, 1]], mean_of_medians, OPTIONS)
    assert (estimate[0], low[0], high[0]) == (2.0, 1.0, 3.0)


def test_hierarchical_bootstrap_pairs_images_across_models() -> None:
    """Model 1 is model 0 shifted by 1 on every image. Drawing the same images for both (all
    models see the same evaluation images), the difference of their medians is exactly 1 in
    every resample, however much each median moves."""
    a = np.random.default_rng(0).exponential(size=50)
    values = np.stack([a, a + 1.0])[:, None, :]
    difference = lambda medians, picked: medians[picked[1][0]] - medians[picked[0][0]]  # noqa: E731
    estimate, low, high = hierarchical_bootstrap(values, [[0], [1]], difference, OPTIONS)
    np.testing.assert_allclose([estimate[0], low[0], high[0]], 1.0, rtol=1e-12)
    _, low, high = hierarchical_bootstrap(values[:1], [[0]], mean_of_medians, OPTIONS)
    assert high[0] - low[0] > 0.1  # while the median itself is uncertain


# --- the summary stage ---


def test_summary_stacks_models_by_lambda_and_seed_with_options_as_coordinates(experiment) -> None:  # noqa: ANN001
    root, models = experiment
    summary = xr.open_zarr(root / "summary.zarr")
    assert list(summary["model"].values) == models
    assert list(summary["lam"].values) == [lam for lam in LAMBDAS for _ in SEEDS]
    assert list(summary["seed"].values) == SEEDS * len(LAMBDAS)
    assert list(summary["setting"].values) == [f"gradnorm-lambda{lam:g}" for lam in LAMBDAS for _ in SEEDS]
    assert summary["alignment"].dims == ("model", "sample")
    assert summary["alignment"].attrs["units"] == "1"
    np.testing.assert_allclose(summary["alignment"].sel(model=models[1]), fake_metrics(0.0, 1)["alignment"])
    assert list(summary["degenerate"].values) == [m == DEGENERATE for m in models]


@pytest.mark.parametrize("subset", SUBSETS)
def test_summary_csv_statistics_match_direct_computation(experiment, subset: str) -> None:  # noqa: ANN001
    root, models = experiment
    table = pd.read_csv(root / "summary.csv").set_index(["model", "subset"])
    for column in ("seed", "degenerate", "n_images", "attack_failures", "robustness_median_ci_low", "bias_term_signed_median"):
        assert column in table.columns
    i = 4  # lambda 0.1, seed 0
    row = table.loc[(models[i], subset)]
    rho = subset_values(0.1, i, "robustness", subset)
    alpha = subset_values(0.1, i, "alignment", subset)
    assert row["n_images"] == rho.size == alpha.size  # both axes rest on the same images
    assert row["robustness_median"] == pytest.approx(np.median(rho), rel=1e-5)
    assert row["robustness_q25"] == pytest.approx(np.quantile(rho, 0.25), rel=1e-5)
    assert (row["robustness_median_ci_low"], row["robustness_median_ci_high"]) == pytest.approx(median_ci(rho, OPTIONS), rel=1e-5)
    assert row["robustness_median_ci_low"] < row["robustness_median"] < row["robustness_median_ci_high"]
    assert row["spearman_alignment_robustness"] == pytest.approx(spearmanr(alpha, rho).statistic, rel=1e-5)
    assert row["lambda"] == 0.1 and row["seed"] == 0 and not row["degenerate"]
    assert row["test_accuracy"] == pytest.approx(0.89)
    failures = 2 if subset == "all" else int((~np.isfinite(fake_metrics(0.1, i)["robustness"].values) & fake_metrics(0.1, i)["correct"].values).sum())
    assert row["attack_failures"] == failures


def test_grid_statistics_average_the_seeds_and_leave_degenerate_models_out(experiment) -> None:  # noqa: ANN001
    root, _ = experiment
    grid = pd.read_csv(root / "summary_grid.csv").set_index(["grid_point", "subset"])
    row = grid.loc[("gradnorm-lambda0.01", "all")]
    medians = [np.median(subset_values(0.01, i, "alignment", "all")) for i in (2, 3)]
    assert row["n_seeds"] == 2
    assert row["alignment_mean_median"] == pytest.approx(np.mean(medians), rel=1e-5)
    assert row["alignment_seed_sd"] == pytest.approx(np.std(medians, ddof=1), rel=1e-5)
    assert row["alignment_mean_median_ci_low"] <= row["alignment_mean_median"] <= row["alignment_mean_median_ci_high"]
    baseline = [np.median(subset_values(0.0, i, "alignment", "all")) for i in (0, 1)]
    assert row["alignment_gain"] == pytest.approx(np.mean(medians) - np.mean(baseline), rel=1e-5)
    assert row["alignment_gain_ci_low"] <= row["alignment_gain"] <= row["alignment_gain_ci_high"]
    assert np.isnan(grid.loc[("gradnorm-lambda0", "all")]["alignment_gain"])  # the baseline itself
    degenerate_point = grid.loc[("gradnorm-lambda0.1", "all")]
    assert degenerate_point["n_seeds"] == 1
    assert degenerate_point["robustness_mean_median"] == pytest.approx(np.median(subset_values(0.1, 4, "robustness", "all")), rel=1e-5)


def test_gains_of_fine_tunes_are_over_the_one_base_model_conditional_on_it(tmp_path) -> None:  # noqa: ANN001
    """train.init base: every grid point's gain is over the base model (not over the method's
    smallest strength). Fine-tunes whose alignment is the base's plus 0.25 on every image have
    a gain of exactly 0.25 and, paired by image and without seed spread, a point interval."""
    eval_store = write_eval_store(tmp_path)
    base = fake_metrics(0.0, 0)
    runs = [(BASE_MODEL, BASE, 0.0, 0, base)]
    runs += [(name(1.0, seed), GRADNORM, 1.0, seed, base.assign(alignment=base["alignment"] + 0.25)) for seed in SEEDS]
    runs += [(name(3.0, seed), GRADNORM, 3.0, seed, base.assign(alignment=base["alignment"] + 0.5)) for seed in SEEDS]
    written = [write_fake_model(tmp_path, eval_store, model, method, strength, seed, metrics, 0.9) for model, method, strength, seed, metrics in runs]
    outputs = {key: tmp_path / f"{key}.csv" for key in ("summary", "summary_grid", "summary_trends")}
    summary_stage(models=[r[0] for r in runs], metrics_stores=[w[1] for w in written], model_dirs=[w[0] for w in written],
                  output_zarr=tmp_path / "summary.zarr", output_csv=outputs["summary"], output_grid_csv=outputs["summary_grid"],
                  output_trends_csv=outputs["summary_trends"], options=OPTIONS)  # fmt: skip
    grid = pd.read_csv(outputs["summary_grid"]).set_index(["grid_point", "subset"])
    for point, shift in (("gradnorm-lambda1", 0.25), ("gradnorm-lambda3", 0.5)):
        row = grid.loc[(point, "all")]
        assert row["alignment_gain"] == pytest.approx(shift, abs=1e-9)
        assert row["alignment_gain_ci_low"] == pytest.approx(shift, abs=1e-9) and row["alignment_gain_ci_high"] == pytest.approx(shift, abs=1e-9)
        assert row["robustness_gain"] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(grid.loc[(BASE_MODEL, "all")]["alignment_gain"])  # the base itself
    summary = xr.open_zarr(tmp_path / "summary.zarr")
    assert "conditional on the one base model" in summary["grid_gain_ci_low"].attrs["long_name"]
    # the base is the method's strength-0 point in its trends, and has no trend of its own
    trends = pd.read_csv(outputs["summary_trends"]).set_index(["subset", "trend"])
    assert trends.loc[("all", "lambda ~ median alignment"), "n_models"] == 5 and trends.loc[("all", "lambda ~ median alignment"), "spearman"] == 1.0
    assert not any(t.startswith(BASE) for t in trends.index.get_level_values("trend"))


def test_trends_are_spearman_across_healthy_models_with_intervals(experiment) -> None:  # noqa: ANN001
    root, models = experiment
    trends = pd.read_csv(root / "summary_trends.csv").set_index(["subset", "trend"])
    healthy = [(lam, i) for i, (lam, _) in enumerate((lam, s) for lam in LAMBDAS for s in SEEDS) if models[i] != DEGENERATE]
    rho = [np.median(subset_values(lam, i, "robustness", "all")) for lam, i in healthy]
    alpha = [np.median(subset_values(lam, i, "alignment", "all")) for lam, i in healthy]
    row = trends.loc[("all", "median alignment ~ median robustness")]
    assert row["spearman"] == pytest.approx(spearmanr(alpha, rho).statistic, rel=1e-6)
    assert row["spearman_ci_low"] <= row["spearman"] <= row["spearman_ci_high"]
    assert row["interval"] == "rerun"  # 5 healthy models in 3 grid points: 2 degrees of freedom for the seed spread
    assert row["n_models"] == len(healthy) and row["excluded_degenerate_models"] == DEGENERATE
    row = trends.loc[("all", "lambda ~ median robustness")]
    assert row["spearman"] == pytest.approx(spearmanr([lam for lam, _ in healthy], rho).statistic, rel=1e-6)


def test_summary_is_reproducible(experiment, tmp_path) -> None:  # noqa: ANN001
    root, _ = experiment
    stacked = xr.open_zarr(root / "summary.zarr").load()
    per_image = [v for v in stacked.data_vars if not str(v).startswith(("model_", "grid_", "trend_", "attack_failures", "in_subset"))]
    again = summarise(stacked[per_image].drop_dims(["grid_point", "trend", "pair", "subset"], errors="ignore"), OPTIONS)
    for var in ("model_median_ci_low", "grid_mean_median_ci_high", "trend_spearman_ci_low"):
        np.testing.assert_array_equal(again[var].values, stacked[var].values)


def test_the_summary_names_the_machine_of_every_model(experiment) -> None:  # noqa: ANN001
    root, models = experiment
    summary = xr.open_zarr(root / "summary.zarr")
    assert list(summary["machine"].values) == [f"machine-{'ab'[s]}" for s in summary["seed"].values]
    assert json.loads(summary.attrs["machines"]) == {"machine-a": {"cpu": "cpu a"}, "machine-b": {"cpu": "cpu b"}}
    table = pd.read_csv(root / "summary.csv")
    assert set(table["machine"]) == {"machine-a", "machine-b"}


def test_degenerate_models_are_named() -> None:
    assert degenerate_reason(0.98, 0.11, 10) is None
    assert "one class" in degenerate_reason(0.11, 0.97, 10)
    assert "near chance" in degenerate_reason(0.15, 0.5, 10)




@pytest.mark.parametrize("content", [None, "{not json", '{"accuracy": 0.9}', '{"test_accuracy": 0.9}'])
def test_a_missing_or_corrupt_test_accuracy_is_a_one_line_store_error(tmp_path, content) -> None:  # noqa: ANN001
    if content is not None:
        (tmp_path / "test_accuracy.json").write_text(content)
    with pytest.raises(StoreError, match="cannot read the test accuracy") as info:
        read_test_accuracy(tmp_path)
    assert "\n" not in str(info.value)




# --- intervals that cover a rerun (docs/statistics.md) ---


def test_seed_interval_is_the_student_t_interval_when_images_do_not_vary() -> None:
    """Three seeds with medians 1, 2, 3 and no image-to-image variation: s = 1, n = 3, and the
    95 % interval is 2 ± t(0.975, 2) / sqrt(3) = 2 ± 4.302653 / 1.732051 (tables)."""
    medians = np.array([[1.0], [2.0], [3.0]])
    low, high = seed_interval(np.array([2.0]), [medians], np.full((50, 1), 2.0), 0.95)
    assert high[0] - 2.0 == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
    assert 2.0 - low[0] == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)


def test_seed_interval_adds_the_image_variance_and_welchs_degrees_of_freedom() -> None:
    """A difference of two means (2 and 4 seeds) plus image noise of variance v: the half-width
    is t(df) sqrt(s1²/2 + s2²/4 + v) with df = (s1²/2 + s2²/4 + v)² / ((s1²/2)² + (s2²/4)²/3)."""
    a, b = np.array([[0.0], [2.0]]), np.array([[1.0], [2.0], [3.0], [6.0]])
    draws = np.random.default_rng(0).normal(size=(4000, 1))
    v = np.var(draws, ddof=1)
    s1, s2 = np.var(a, ddof=1) / 2, np.var(b, ddof=1) / 4
    se2 = s1 + s2 + v
    df = se2**2 / (s1**2 + s2**2 / 3)
    low, high = seed_interval(np.array([1.0]), [a, b], draws, 0.9)
    assert (high[0] - 1.0) == pytest.approx(scipy.stats.t.ppf(0.95, df) * np.sqrt(se2), rel=1e-9)
    assert low[0] == pytest.approx(2.0 - high[0], rel=1e-9)


def test_seed_interval_of_a_single_seed_is_the_image_percentile_interval() -> None:
    draws = np.arange(101.0)[:, None]
    low, high = seed_interval(np.array([50.0]), [np.array([[50.0]])], draws, 0.9)
    # linear interpolation between order statistics: exact up to float64 rounding of 0.05 * 100
    assert (low[0], high[0]) == pytest.approx((5.0, 95.0), rel=4 * np.finfo(float).eps)


def test_a_rerun_draw_needs_replicates() -> None:
    rng = np.random.default_rng(0)
    values = np.arange(4.0)[None, :, None]
    assert rerun_draws(values, [[0], [1], [2], [3]], rng) is None  # one model a grid point
    assert rerun_draws(values, [[0, 1], [2, 3]], rng).shape == values.shape


def test_rank_correlation_is_spearmans() -> None:
    x, y = np.random.default_rng(0).normal(size=(2, 5, 12))
    y[:, :4] = x[:, :4]
    x[:, 6] = x[:, 7]  # a tie
    expected = [spearmanr(a, b).statistic for a, b in zip(x, y)]
    np.testing.assert_allclose(rank_correlation(x, y), expected, rtol=1e-12)


def test_rerun_draws_reproduce_the_seed_spread_they_were_given() -> None:
    """Many grid points of 3 seeds with a known within-point covariance: the drawn models'
    within-point covariance is that of the data (the inverse-Wishart's mean with many degrees
    of freedom), and their grid means scatter around the data's by covariance · 2/3 (the
    mean's own draw, covariance/3, plus the mean of 3 new seeds, covariance/3)."""
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.6], [0.6, 2.0]])
    groups = [list(range(3 * g, 3 * g + 3)) for g in range(400)]
    data = np.repeat(rng.normal(size=(400, 2)) * 5, 3, axis=0) + rng.multivariate_normal([0, 0], cov, size=1200)
    (drawn,) = rerun_draws(data[None], groups, rng)
    residual = np.concatenate([drawn[g] - drawn[g].mean(axis=0) for g in groups])
    # 800 degrees of freedom twice (data, draw): each entry's sampling sd is below 0.15
    np.testing.assert_allclose(residual.T @ residual / 800, cov, atol=0.45)
    shift = np.array([drawn[g].mean(axis=0) - data[g].mean(axis=0) for g in groups])
    np.testing.assert_allclose(np.cov(shift.T), 2 * cov / 3, atol=0.45)  # 400 points: sd below 0.15


def test_the_rerun_interval_of_a_trend_covers_reruns_at_its_level() -> None:
    """Simulated experiments of 4 grid points × 3 seeds from one normal model (near the
    default run's medians): the interval built from one experiment holds the Spearman
    correlation of an independent rerun in about 95 % of the experiments, where the
    percentile bootstrap over the 3 seeds (the former method) holds it far less often."""
    rng = np.random.default_rng(2)
    means = np.array([[3.4, 1.67], [4.1, 1.84], [4.15, 1.95], [4.4, 2.0]])
    cov = np.array([[0.02, 0.004], [0.004, 0.003]])
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]

    def experiment() -> np.ndarray:
        return np.repeat(means, 3, axis=0) + rng.multivariate_normal([0, 0], cov, size=12)

    covered = bootstrap_covered = 0
    trials = 400
    for _ in range(trials):
        data, rerun = experiment(), experiment()
        observed = spearmanr(*rerun.T).statistic
        drawn = rerun_draws(np.repeat(data[None], 500, axis=0), groups, rng)
        low, high = np.quantile(rank_correlation(drawn[..., 0], drawn[..., 1]), [0.025, 0.975])
        covered += low <= observed <= high
        seeds = np.concatenate([rng.choice(g, size=(500, 3)) for g in groups], axis=1)
        low, high = np.quantile(rank_correlation(data[seeds, 0], data[seeds, 1]), [0.025, 0.975])
        bootstrap_covered += low <= observed <= high
    # binomial sd at 95 % over 400 trials: 1.1 %
    assert 0.91 <= covered / trials <= 0.99
    assert bootstrap_covered / trials < 0.85
