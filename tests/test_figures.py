"""The figures draw what the summary store holds: each figure function is called on a small
synthetic summary, written by the real summary stage, and its points, bars, bands, images,
axis labels and legends are read back from the returned matplotlib figure and compared with
the summary's variables. Then the figure stage itself: PNG and PDF, and its refusals."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.container import BarContainer, ErrorbarContainer  # noqa: E402

from conftest import assert_within, draw_figure, float_tolerance, source_attrs, write_summary  # noqa: E402
from saliency_robustness import figure_list, gallery, plotting  # noqa: E402
from saliency_robustness.data import CIFAR10_INPUT_SPACE, DISTANCE, MNIST_INPUT_SPACE, eval_dataset  # noqa: E402
from saliency_robustness.errors import PipelineError, StoreError  # noqa: E402
from saliency_robustness.models import ModelSpec, save_machine  # noqa: E402
from saliency_robustness.plotting import FigureInputs  # noqa: E402
from saliency_robustness.stages.concordance import concordance_stage
from saliency_robustness.stages.figures import FIGURES, RANKING_NAMES, figure_stage  # noqa: E402
from saliency_robustness.statistics import BootstrapOptions  # noqa: E402
from saliency_robustness.stores import write_store  # noqa: E402
from saliency_robustness.vocabulary import (  # noqa: E402
    ADVERSARIAL,
    ATTRIBUTION_LABELS,
    ATTRIBUTIONS,
    EXTERNAL,
    GRADIENT,
    GRADNORM,
    METHODS,
    TRAINED_METHODS,
    grid_point_name,
    model_name,
)

N = 16  # images per model
LEVEL = 0.9  # the summary's confidence level: not the schema's default, so that the figures must read it
OPTIONS = BootstrapOptions(n_resamples=200, confidence_level=LEVEL, seed=0)
#: units of the per-image quantities, as the metrics stage gives them; distinct, so that axis labels must read them
UNITS = {"robustness": DISTANCE, "alignment": DISTANCE, "linearized_robustness": DISTANCE, "homogeneous_term": DISTANCE,
         "bias_term_signed": DISTANCE, "bound_angle_term": DISTANCE, "bound_bias_term": DISTANCE}  # fmt: skip
LAMBDAS = [0.0, 0.01, 0.1]
DEGENERATE = model_name(GRADNORM, 0.01, 0)  # near-chance accuracy: the gallery must show seed 1 of its grid point
#: classes of the evaluation images: the first image of each class is not among the first few images
LABELS = (np.arange(N) // 2) % 5
MIXED_GRID = [(GRADNORM, 0.0), (GRADNORM, 1.0), (ADVERSARIAL, 0.5), (ADVERSARIAL, 2.0)]


def fake_metrics(method: str, strength: float, i: int, attributions: list[str]) -> xr.Dataset:
    """A metrics store's per-image variables, each of its own size, with two attack failures."""
    rng = np.random.default_rng(i)
    robustness = rng.gamma(2.0, 0.5 + (strength if method == GRADNORM else 0.5 * strength), N)
    robustness[:2] = np.nan
    alignment = 0.5 * np.nan_to_num(robustness) + rng.normal(0, 0.05, N)
    bias = rng.uniform(-0.3, 0.3, N)
    per_image = {
        "robustness": robustness,
        "alignment": alignment,
        "alignment_cosine": alignment / 9.0,
        "linearized_robustness": robustness * 1.1 + rng.uniform(0, 0.1, N),
        "homogeneity": rng.uniform(0.2, 1.0, N),
        "homogeneous_term": robustness * 1.1 - bias,
        "bias_term_signed": bias,
        "bound_angle_term": rng.uniform(0, 1, N),
        "bound_bias_term": np.abs(bias),
        "correct": rng.uniform(size=N) < 0.7,
        "edge_correlation": np.random.default_rng(1000 + i).uniform(-0.2, 0.6, N),  # its own draws: the others stay as they were
    }
    per_image["label"] = LABELS
    per_image["prediction"] = np.where(per_image["correct"], LABELS, (LABELS + 1) % 10)
    ds = xr.Dataset(
        {k: ("sample", v, {"long_name": k, "units": UNITS.get(k, "1")}) for k, v in per_image.items()}, coords={"sample": np.arange(N)}
    )
    if attributions:
        scale = np.linspace(1.0, 0.6, len(attributions))[None, :]
        ds = ds.assign_coords(attribution=attributions)
        ds["attribution_alignment"] = (("sample", "attribution"), alignment[:, None] * scale, {"long_name": "alignment", "units": DISTANCE})
        ds["attribution_alignment_cosine"] = (("sample", "attribution"), alignment[:, None] * scale / 9, {"long_name": "cosine", "units": "1"})
    return ds


def build_experiment(root: Path, grid: list[tuple[str, float]], seeds: list[int], attributions: list[str]) -> tuple[Path, list[str]]:
    """Models of ``grid`` x ``seeds`` with fake metrics and saliency stores, an evaluation store,
    and their ``summary.zarr`` written by the summary stage; returns ``root`` and the model names."""
    images = np.random.default_rng(0).random((N, 1, 8, 8)).astype(np.float32)
    names = [f"digit {k}" for k in range(10)]
    eval_store = write_store(eval_dataset(images, LABELS, np.arange(N), MNIST_INPUT_SPACE, class_names=names), root / "eval.zarr")
    models, metrics, dirs = [], [], []
    for i, ((method, strength), seed) in enumerate((p, s) for p in grid for s in seeds):
        model = model_name(method, strength, seed)
        models.append(model)
        d = root / "models" / model
        d.mkdir(parents=True)
        spec = ModelSpec(name=model, architecture="mnist_cnn", method=method, strength=strength, sensitivity="loss", p=2.0, seed=seed,
                         num_classes=10, in_channels=1, image_size=8, training={"seed": seed})  # fmt: skip
        (d / "spec.json").write_text(spec.to_json())
        accuracy = 0.1 if model == DEGENERATE else 0.99 - 0.1 * i
        (d / "test_accuracy.json").write_text(json.dumps({"test_accuracy": accuracy, "majority_class_share": 0.12}))
        save_machine(d, {"id": "test-machine"})
        write_store(fake_metrics(method, strength, i, attributions).assign_attrs(source_attrs(d, eval_store)), root / "metrics" / f"{model}.zarr")
        metrics.append(root / "metrics" / f"{model}.zarr")
        dirs.append(d)
        maps = np.random.default_rng(100 + i).normal(size=(max(len(attributions), 1), N, 1, 8, 8))
        saliency = xr.Dataset({"saliency": (("sample", "channel", "y", "x"), maps[0])})
        if attributions:
            saliency["attribution_map"] = (("attribution", "sample", "channel", "y", "x"), maps)
            saliency = saliency.assign_coords(attribution=attributions)
        write_store(saliency.assign_attrs(source_attrs(d, eval_store)), root / "saliency" / f"{model}.zarr")
    write_summary(root, models, metrics, dirs, OPTIONS)
    if attributions:  # the explanation-quality scores and their concordance
        write_concordance(root, models, attributions)
    return root, models


def write_concordance(root: Path, models: list[str], attributions: list[str]) -> None:
    """Fake quality stores (scores that grow with the model's median alignment, but max-sensitivity falling and
    the ROAD area unrelated) and the concordance stage's store from them."""
    summary = xr.open_zarr(root / "summary.zarr")
    stores = []
    for i, model in enumerate(models):
        rng = np.random.default_rng(200 + i)
        alignment = float(summary["alignment"].sel(model=model).median())
        scores = {
            "gini": alignment + rng.normal(0, 0.01, (len(attributions), N)),
            "road_area": rng.normal(0, 1, (len(attributions), N)),
            "max_sensitivity": -alignment + rng.normal(0, 0.01, (len(attributions), N)),
            "infidelity": rng.gamma(2.0, 1.0, (len(attributions), N)),
        }
        ds = xr.Dataset(
            {k: (("attribution", "sample"), v) for k, v in scores.items()}
            | {"prediction": ("sample", summary["prediction"].sel(model=model).values), "label": ("sample", LABELS)},
            coords={"attribution": attributions, "sample": np.arange(N)},
            attrs={"computed_from": json.dumps({"model": model})},
        )
        stores.append(write_store(ds, root / "quality" / f"{model}.zarr"))
    concordance_stage(
        models=[str(m) for m in summary["model"].values],
        summary_store=root / "summary.zarr",
        quality_stores=[root / "quality" / f"{m}.zarr" for m in summary["model"].values],
        output_zarr=root / "concordance.zarr",
        output_csv=root / "summary_concordance.csv",
        output_quality_csv=root / "summary_quality.csv",
        options=OPTIONS,
    )


@pytest.fixture(scope="module")
def lambdas(tmp_path_factory):  # noqa: ANN001, ANN201
    """Gradient-norm models only: three lambdas, two seeds, one model degenerate, the gradient only."""
    return build_experiment(tmp_path_factory.mktemp("lambdas"), [(GRADNORM, lam) for lam in LAMBDAS], [0, 1], [])


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):  # noqa: ANN001, ANN201
    """Both training methods, two seeds, every attribution map."""
    return build_experiment(tmp_path_factory.mktemp("mixed"), MIXED_GRID, [0, 1], list(ATTRIBUTIONS))


def load(experiment: tuple[Path, list[str]]) -> xr.Dataset:
    return xr.open_zarr(experiment[0] / "summary.zarr").load()


def inputs_of(experiment: tuple[Path, list[str]], subset: str = "all", gallery_samples: int = 6) -> FigureInputs:
    """What the figure stage hands a figure: the summary, and the eval and saliency stores."""
    root, models = experiment
    saliency = {m: xr.open_zarr(root / "saliency" / f"{m}.zarr").load() for m in models}
    options = {"subset": subset, "gallery_samples": gallery_samples, "dpi": 60}
    return FigureInputs(load(experiment), options, xr.open_zarr(root / "eval.zarr").load(), saliency)


@pytest.fixture(autouse=True)
def _close_figures():  # noqa: ANN202
    yield
    plt.close("all")


# --- reading back what a figure drew -----------------------------------------------------------


def points_with_bars(ax: plt.Axes, marker: str) -> tuple[np.ndarray, np.ndarray]:
    """Every point drawn with ``marker`` by ``errorbar``, sorted: its centre ``(x, y)``, and the
    ends of its bars ``(x low, x high, y low, y high)`` (NaN where it has no x bar)."""
    centres, ends = [], []
    for container in ax.containers:
        if not isinstance(container, ErrorbarContainer) or container.lines[0].get_marker() != marker:
            continue
        data, _, bar_lines = container.lines
        x_bars = bar_lines[0].get_segments() if container.has_xerr else None
        y_bars = bar_lines[-1].get_segments()
        for k, (x, y) in enumerate(data.get_xydata()):
            nowhere = ((np.nan, y), (np.nan, y))  # no bar (or none drawn: a point at x = NaN)
            (x_low, y_at), (x_high, _) = x_bars[k] if x_bars is not None and len(x_bars[k]) else nowhere
            (y_low, x_at), (y_high, _) = (p[::-1] for p in y_bars[k]) if len(y_bars[k]) else ((np.nan, x), (np.nan, x))
            assert np.array_equal((x_at, y_at), (x, y), equal_nan=True), "a bar is not at its point"
            centres.append((x, y))
            ends.append((x_low, x_high, y_low, y_high))
    order = sorted(range(len(centres)), key=lambda k: tuple(np.nan_to_num(centres[k], nan=np.inf)))
    return np.array([centres[k] for k in order]).reshape(-1, 2), np.array([ends[k] for k in order]).reshape(-1, 4)


def assert_points(ax: plt.Axes, marker: str, expected: list[tuple[float, ...]]) -> None:
    """The points drawn with ``marker`` are at ``expected``'s ``(x, y)`` (the stored values,
    unchanged), and their bars end at its ``(x low, x high, y low, y high)`` (NaN: no x bar),
    up to the rounding of ``centre - (centre - end)``."""
    centres, ends = points_with_bars(ax, marker)
    want = np.array(sorted(expected)).reshape(-1, 6)
    assert len(centres) == len(want), f"{len(centres)} points drawn with {marker!r}, {len(want)} expected"
    np.testing.assert_array_equal(centres, want[:, :2])
    assert np.isfinite(want[:, 4:]).all(), "the fixture should give every point a finite CI"
    tolerance = np.nan_to_num(float_tolerance(np.float64, np.repeat(want[:, :2], 2, axis=1), want[:, 2:], terms=2))
    assert_within(ends, want[:, 2:], tolerance, f"bars of the points drawn with {marker!r}")


def line_points(ax: plt.Axes, **properties: object) -> list[np.ndarray]:
    """The ``(x, y)`` data of each line of ``ax`` with the given properties (``color``, ``marker``, ``label``...)."""
    found = []
    for line in ax.lines:
        if all(getattr(line, f"get_{key}")() == value for key, value in properties.items()):
            found.append(line.get_xydata())
    return found


def band(collection: PolyCollection) -> set[tuple[float, float]]:
    """The corners of a ``fill_between`` band."""
    (path,) = collection.get_paths()
    return {(float(x), float(y)) for x, y in path.vertices}


def legend_texts(ax: plt.Axes) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def model_rows(summary: xr.Dataset, models: list[str], x: str, y: str, subset: str) -> list[tuple[float, ...]]:
    """Per model: its stored medians of ``x`` and ``y``, and the ends of their CIs."""
    stat = {s: summary[f"model_{s}"].sel(subset=subset, model=models) for s in ("median", "median_ci_low", "median_ci_high")}
    return [
        tuple(float(stat[s].sel(model=m, quantity=q)) for s, q in
              (("median", x), ("median", y), ("median_ci_low", x), ("median_ci_high", x), ("median_ci_low", y), ("median_ci_high", y)))
        for m in models
    ]  # fmt: skip


def grid_rows(summary: xr.Dataset, points: list[str], x: str, y: str, subset: str) -> list[tuple[float, ...]]:
    """Per grid point: its stored means over seeds of the medians of ``x`` and ``y``, and the ends of their CIs."""
    stat = {s: summary[f"grid_{s}"].sel(subset=subset) for s in ("mean_median", "mean_median_ci_low", "mean_median_ci_high")}
    return [
        tuple(float(stat[s].sel(grid_point=p, quantity=q)) for s, q in
              (("mean_median", x), ("mean_median", y), ("mean_median_ci_low", x), ("mean_median_ci_high", x),
               ("mean_median_ci_low", y), ("mean_median_ci_high", y)))
        for p in points
    ]  # fmt: skip


def models_of(summary: xr.Dataset, *, method: str | None = None, degenerate: bool | None = None) -> list[str]:
    keep = np.ones(summary.sizes["model"], dtype=bool)
    if method is not None:
        keep &= summary["method"].values == method
    if degenerate is not None:
        keep &= summary["degenerate"].values.astype(bool) == degenerate
    return [str(m) for m in summary["model"].values[keep]]


def grid_points_of(summary: xr.Dataset, method: str) -> list[str]:
    """The grid points of ``method`` by strength."""
    points = summary["grid_point"].values[summary["grid_method"].values == method]
    strengths = summary["grid_strength"].values[summary["grid_method"].values == method]
    return [str(p) for _, p in sorted(zip(strengths, points))]


def expected_trend(summary: xr.Dataset, trend: str, subset: str) -> str:
    t = summary.sel(subset=subset, trend=trend)
    interval = {"rerun": "rerun interval"}.get(str(t["trend_interval"].values), "CI over images only")
    value, low, high = (float(t[v]) for v in ("trend_spearman", "trend_spearman_ci_low", "trend_spearman_ci_high"))
    return f"Spearman {value:.2f} [{low:.2f}, {high:.2f}] ({LEVEL:.0%} {interval}, {int(t['trend_points'])} models)"


def assert_footer(fig: plt.Figure, summary: xr.Dataset, subset: str) -> None:
    """The footer names the subset, the image counts, the attack failures, the degenerate
    models and the level of the CIs, all as the summary has them."""
    (text,) = [t.get_text() for t in fig.texts if t.get_text().startswith(("all evaluation", "correctly classified"))]
    n = summary["model_n_images"].sel(subset=subset).values
    assert text.startswith({"all": "all evaluation images", "correct": "correctly classified images"}[subset])
    assert f": {n.min()}–{n.max()} per model" in text or (n.min() == n.max() and f": {n.min()} per model" in text)
    failures = int(summary["attack_failures"].sel(subset=subset).sum())
    assert f"attack failures (ρ = NaN, left out): {failures} in all" in text
    if subset == "all":
        assert failures == 2 * summary.sizes["model"]  # fake_metrics: two per model
    assert f"Bars: {LEVEL:.0%} CIs" in text
    degenerate = models_of(summary, degenerate=True)
    assert (f"Degenerate (×, left out of means and trends): {', '.join(degenerate)}." in text) == bool(degenerate)


def unit(quantity: str) -> str:
    """How an axis label names the units ``fake_metrics`` gives ``quantity``."""
    units = UNITS.get(quantity, "1")
    return "unitless" if units == "1" else units


#: the axis name of each quantity a median plot draws
AXIS_NAMES = {
    "robustness": "robustness ρ(x)",
    "alignment": "alignment α(x)",
    "alignment_cosine": "alignment |cos∠(x, g)|",
    "linearized_robustness": "linearized robustness ρ̃(x)",
    "homogeneity": "homogeneity ⟨x, g†⟩ / Ψ†(x)",
}
DISTANCE_AXIS = f"{DISTANCE} (mean over seeds of per-model medians)"


# --- the list of figures -----------------------------------------------------------------------


def test_the_stage_draws_the_listed_figures_in_their_order() -> None:
    assert tuple(FIGURES) == figure_list.FIGURE_NAMES
    assert len(FIGURES) == 10 and figure_list.LAMBDA_FIGURES < set(FIGURES) and figure_list.QUALITY_FIGURES < set(FIGURES)


def test_the_figure_list_imports_no_plotting_library() -> None:
    """The Snakefile reads the list of figures at every start: without matplotlib, seaborn,
    pandas or numpy."""
    heavy = ("matplotlib", "seaborn", "pandas", "numpy", "xarray", "torch", "scipy")
    code = f"import sys, saliency_robustness.figure_list; print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
    imports = {node.module for node in ast.walk(ast.parse(Path(figure_list.__file__).read_text())) if isinstance(node, ast.ImportFrom)}
    assert imports <= {"__future__", "collections.abc", "saliency_robustness.vocabulary"}


def test_figures_against_lambda_need_gradient_norm_models() -> None:
    every = list(figure_list.FIGURE_NAMES)
    assert figure_list.figures_for([GRADNORM], quality=True) == every == figure_list.figures_for([ADVERSARIAL, GRADNORM, EXTERNAL], quality=True)
    assert figure_list.figures_for([ADVERSARIAL, EXTERNAL], quality=True) == [f for f in every if f not in figure_list.LAMBDA_FIGURES]
    assert set(every) - set(figure_list.figures_for([EXTERNAL], quality=True)) == {"accuracy_robustness_vs_lambda", "decomposition_terms"}
    assert figure_list.figures_for([ADVERSARIAL], quality=True) == figure_list.figures_for([EXTERNAL], quality=True)


def test_quality_figures_need_the_quality_measures() -> None:
    without = figure_list.figures_for([GRADNORM], quality=False)
    assert set(figure_list.FIGURE_NAMES) - set(without) == set(figure_list.QUALITY_FIGURES) == {"quality_concordance"}


def test_grid_points_are_labelled_by_their_methods_strength() -> None:
    assert plotting.display_label(grid_point_name(model_name(GRADNORM, 0.3, 1))) == "λ=0.3"
    assert plotting.display_label(grid_point_name(model_name(ADVERSARIAL, 1.5, 0))) == "PGD ε=1.5"
    assert plotting.display_label("robustbench-Engstrom2019") == "robustbench-Engstrom2019"  # an external model: its name
    assert set(plotting.STRENGTH_LABELS) == set(TRAINED_METHODS)
    assert list(plotting.METHOD_STYLE) == list(METHODS)  # every method has a style, in stacking order
    assert set(plotting.SUBSET_DESCRIPTIONS) == {"all", "correct"}


def test_quantities_are_named_with_their_attribution_map() -> None:
    assert plotting.quantity_name("alignment_smoothgrad") == f"alignment α(x) of {ATTRIBUTION_LABELS['smoothgrad']}"
    assert plotting.quantity_name("alignment_cosine_integrated_gradients") == "alignment |cos∠(x, a)|, a = IG"
    assert plotting.quantity_name("bound_rhs") == "bound rhs"


# --- median against median: one point per model, one diamond per grid point --------------------

MEDIAN_PLOTS = [
    ("alignment_vs_robustness", 0, "alignment"),
    ("alignment_vs_robustness", 1, "alignment_cosine"),
    ("linearized_vs_robustness", 0, "linearized_robustness"),
    ("homogeneity_vs_robustness", 0, "homogeneity"),
]


@pytest.mark.parametrize("subset", ["all", "correct"])
@pytest.mark.parametrize(("figure", "k", "quantity"), MEDIAN_PLOTS)
def test_median_plots_draw_the_stored_medians_and_cis(lambdas, figure: str, k: int, quantity: str, subset: str) -> None:  # noqa: ANN001
    """Dots at each healthy model's medians with bars at their CIs, diamonds at each grid
    point's mean over seeds with theirs, a cross at the degenerate model, the line through
    the diamonds by lambda; axes named with the quantity and its units."""
    summary = load(lambdas)
    fig = FIGURES[figure](inputs_of(lambdas, subset))
    ax = fig.axes[k]
    assert_points(ax, "o", model_rows(summary, models_of(summary, degenerate=False), "robustness", quantity, subset))
    points = grid_points_of(summary, GRADNORM)
    assert_points(ax, "D", grid_rows(summary, points, "robustness", quantity, subset))
    (cross,) = line_points(ax, marker="x")
    np.testing.assert_array_equal(cross, [row[:2] for row in model_rows(summary, [DEGENERATE], "robustness", quantity, subset)])
    (joined,) = line_points(ax, color="0.6", linestyle="-")
    np.testing.assert_array_equal(joined, [row[:2] for row in grid_rows(summary, points, "robustness", quantity, subset)])
    assert ax.get_xlabel() == f"median robustness ρ(x) ({DISTANCE})"
    assert ax.get_ylabel() == f"median {AXIS_NAMES[quantity]} ({unit(quantity)})"
    if ax.get_legend() is not None:
        labels = ["λ=0", "λ=0.01", "λ=0.1", "one seed", "degenerate"]
        assert legend_texts(ax) == labels + (["identity ρ̃ = ρ"] if figure == "linearized_vs_robustness" else [])
    assert_footer(fig, summary, subset)


def test_the_central_figure_names_its_trend_and_the_cosine_panel(lambdas) -> None:  # noqa: ANN001
    summary = load(lambdas)
    fig = FIGURES["alignment_vs_robustness"](inputs_of(lambdas))
    trend = "median alignment ~ median robustness"
    assert fig.get_suptitle() == f"{trend}: {expected_trend(summary, trend, 'all')}"
    assert [ax.get_title() for ax in fig.axes] == ["Alignment against robustness", "Cosine version (alignment / ||x||)"]
    assert fig.axes[0].get_legend().get_title().get_text() == "grid point (mean over seeds)" and fig.axes[1].get_legend() is None


def test_the_identity_line_spans_the_models_cis(lambdas) -> None:  # noqa: ANN001
    summary = load(lambdas)
    ax = FIGURES["linearized_vs_robustness"](inputs_of(lambdas)).axes[0]
    (identity,) = line_points(ax, linestyle="--", color="0.4")
    ends = summary["model_median_ci_low"].sel(subset="all", quantity=["robustness", "linearized_robustness"])
    low, high = float(ends.min()), float(summary["model_median_ci_high"].sel(subset="all", quantity=["robustness", "linearized_robustness"]).max())
    np.testing.assert_array_equal(identity, [[low, low], [high, high]])


def test_each_method_has_its_markers_its_line_and_its_labels(mixed) -> None:  # noqa: ANN001
    """Two methods, one seed drawn per model: gradnorm models as dots and diamonds on a solid
    line, PGD models as squares and hexagons on a dashed one, labelled by their strength."""
    summary = load(mixed)
    ax = FIGURES["alignment_vs_robustness"](inputs_of(mixed)).axes[0]
    for method, (model_marker, grid_marker, _), style in ((GRADNORM, plotting.METHOD_STYLE[GRADNORM], "-"), (ADVERSARIAL, plotting.METHOD_STYLE[ADVERSARIAL], "--")):  # noqa: E501
        assert_points(ax, model_marker, model_rows(summary, models_of(summary, method=method), "robustness", "alignment", "all"))
        points = grid_points_of(summary, method)
        assert_points(ax, grid_marker, grid_rows(summary, points, "robustness", "alignment", "all"))
        (joined,) = line_points(ax, color="0.6", linestyle=style)
        np.testing.assert_array_equal(joined, [row[:2] for row in grid_rows(summary, points, "robustness", "alignment", "all")])
    assert (plotting.METHOD_STYLE[GRADNORM][:2], plotting.METHOD_STYLE[ADVERSARIAL][:2]) == (("o", "D"), ("s", "h"))
    assert legend_texts(ax) == ["λ=0", "λ=1", "PGD ε=0.5", "PGD ε=2", "one seed"]


def test_each_attribution_maps_alignment_is_drawn_in_its_own_panel(mixed) -> None:  # noqa: ANN001
    summary = load(mixed)
    fig = FIGURES["attribution_alignment_vs_robustness"](inputs_of(mixed))
    assert len(fig.axes) == len(ATTRIBUTIONS)
    for ax, attribution in zip(fig.axes, ATTRIBUTIONS):
        quantity = "alignment" if attribution == GRADIENT else f"alignment_{attribution}"
        for method in (GRADNORM, ADVERSARIAL):
            model_marker, grid_marker, _ = plotting.METHOD_STYLE[method]
            assert_points(ax, model_marker, model_rows(summary, models_of(summary, method=method), "robustness", quantity, "all"))
            assert_points(ax, grid_marker, grid_rows(summary, grid_points_of(summary, method), "robustness", quantity, "all"))
        trend = f"median {quantity} ~ median robustness"
        assert ax.get_title() == f"{ATTRIBUTION_LABELS[attribution]}\n{expected_trend(summary, trend, 'all')}"
        assert ax.get_ylabel() == f"median |⟨x, a⟩| / ‖a‖ ({DISTANCE})" and ax.get_xlabel() == f"median robustness ρ(x) ({DISTANCE})"
        assert (ax.get_legend() is not None) == (attribution == GRADIENT)
    assert_footer(fig, summary, "all")


# --- against lambda ----------------------------------------------------------------------------

LAMBDA_AXIS = "regularization strength λ (per example; symlog axis)"


def test_accuracy_is_drawn_per_seed_against_lambda(lambdas) -> None:  # noqa: ANN001
    summary = load(lambdas)
    ax = FIGURES["accuracy_robustness_vs_lambda"](inputs_of(lambdas)).axes[0]
    drawn = [xy for xy in line_points(ax) if len(xy)]
    for seed, line in zip([0, 1], drawn, strict=True):
        models = summary.sel(model=summary["seed"] == seed)
        np.testing.assert_array_equal(line, np.stack([models["lam"].values, models["test_accuracy"].values], axis=1))
    assert ax.get_xlabel() == LAMBDA_AXIS and ax.get_ylabel() == "clean test accuracy (fraction)" and ax.get_xscale() == "symlog"


@pytest.mark.parametrize(("k", "quantity"), [(1, "robustness"), (2, "alignment")])
def test_medians_against_lambda_are_the_stored_ones_with_the_mean_over_seeds_as_a_band(lambdas, k: int, quantity: str) -> None:  # noqa: ANN001
    summary = load(lambdas)
    fig = FIGURES["accuracy_robustness_vs_lambda"](inputs_of(lambdas))
    ax = fig.axes[k]
    healthy = models_of(summary, degenerate=False)
    lam = {m: float(summary["lam"].sel(model=m)) for m in summary["model"].values}
    rows = [(lam[m], *row[1:2], np.nan, np.nan, *row[4:]) for m, row in zip(healthy, model_rows(summary, healthy, quantity, quantity, "all"))]
    assert_points(ax, "o", rows)
    (cross,) = line_points(ax, marker="x")
    np.testing.assert_array_equal(cross, [(lam[DEGENERATE], model_rows(summary, [DEGENERATE], quantity, quantity, "all")[0][1])])
    grid = summary.sel(subset="all", quantity=quantity)
    (mean,) = line_points(ax, label="mean over seeds")
    np.testing.assert_array_equal(mean, np.stack([grid["grid_lam"].values, grid["grid_mean_median"].values], axis=1))
    (fill,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    corners = {(float(x), float(y)) for v in ("low", "high") for x, y in zip(grid["grid_lam"].values, grid[f"grid_mean_median_ci_{v}"].values)}
    assert band(fill) == corners
    assert ax.get_xlabel() == LAMBDA_AXIS and ax.get_ylabel() == f"median {AXIS_NAMES[quantity]} ({DISTANCE})"
    assert sorted(legend_texts(ax)) == sorted(["seed 0", "seed 1", "degenerate", "mean over seeds", "its CI"])
    trends = [f"lambda ~ median {q}: {expected_trend(summary, f'lambda ~ median {q}', 'all')}" for q in ("robustness", "alignment")]
    assert fig.get_suptitle() == "\n".join(trends)
    assert_footer(fig, summary, "all")


def test_figures_against_lambda_say_they_leave_other_methods_out(mixed) -> None:  # noqa: ANN001
    summary = load(mixed)
    note = "\n(gradnorm models only; adversarial models have no λ and are in the other figures)"
    fig = FIGURES["accuracy_robustness_vs_lambda"](inputs_of(mixed))
    assert fig.get_suptitle().endswith(note)
    centres, _ = points_with_bars(fig.axes[1], "o")
    gradnorm = models_of(summary, method=GRADNORM)
    medians = model_rows(summary, gradnorm, "robustness", "alignment", "all")
    expected = [(float(summary["lam"].sel(model=m)), row[0]) for m, row in zip(gradnorm, medians)]
    np.testing.assert_array_equal(centres[np.isfinite(centres[:, 0])], sorted(expected))
    assert FIGURES["decomposition_terms"](inputs_of(mixed)).axes[0].get_title().endswith(note)


def test_the_decomposition_terms_are_the_stored_means_over_seeds_against_lambda(lambdas) -> None:  # noqa: ANN001
    summary = load(lambdas)
    fig = FIGURES["decomposition_terms"](inputs_of(lambdas))
    ax = fig.axes[0]
    names = {"linearized_robustness": "linearized robustness ρ̃", "homogeneous_term": "homogeneous term ⟨x, ḡ†⟩",
             "bias_term_signed": "signed bias term β†/‖g†‖"}  # fmt: skip
    fills = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(fills) == len(names)
    for fill, (quantity, name) in zip(fills, names.items()):
        grid = summary.sel(subset="all", quantity=quantity)
        (line,) = line_points(ax, label=f"median {name}")
        np.testing.assert_array_equal(line, np.stack([grid["grid_lam"].values, grid["grid_mean_median"].values], axis=1))
        corners = {(float(x), float(y)) for v in ("low", "high") for x, y in zip(grid["grid_lam"].values, grid[f"grid_mean_median_ci_{v}"].values)}
        assert band(fill) == corners
    assert legend_texts(ax) == [f"median {name}" for name in names.values()]
    assert ax.get_xlabel() == LAMBDA_AXIS and ax.get_ylabel() == DISTANCE_AXIS
    assert_footer(fig, summary, "all")


# --- the bound, per grid point -----------------------------------------------------------------


def test_the_bound_stacks_the_stored_terms_under_the_linearized_robustness(lambdas) -> None:  # noqa: ANN001
    summary = load(lambdas)
    fig = FIGURES["bound_decomposition"](inputs_of(lambdas))
    ax = fig.axes[0]
    points = grid_points_of(summary, GRADNORM)
    grid = summary["grid_mean_median"].sel(subset="all", grid_point=points)
    stacks = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [c.get_label() for c in stacks] == ["median alignment α", "median angle term ||x||·||ḡ† − ḡ||", "median bias term |β†|/||g†||"]
    bottom = np.zeros(len(points))
    for container, quantity in zip(stacks, ("alignment", "bound_angle_term", "bound_bias_term")):
        heights = grid.sel(quantity=quantity).values
        np.testing.assert_array_equal([bar.get_y() for bar in container.patches], bottom)
        # a bar keeps its corners: its height comes back as (bottom + height) - bottom
        drawn = [bar.get_height() for bar in container.patches]
        assert_within(drawn, heights, float_tolerance(np.float64, bottom, heights, terms=2), quantity)
        bottom = bottom + heights
    assert [t.get_text() for t in ax.get_xticklabels()] == ["λ=0", "λ=0.01", "λ=0.1"]
    rho = summary.sel(subset="all", quantity="linearized_robustness", grid_point=points)
    means = grid_rows(summary, points, "linearized_robustness", "linearized_robustness", "all")
    rows = [(k, *row[1:2], np.nan, np.nan, *row[4:]) for k, row in enumerate(means)]  # at the categories 0, 1, 2
    assert_points(ax, "_", rows)
    np.testing.assert_array_equal(points_with_bars(ax, "_")[0][:, 1], rho["grid_mean_median"].values)
    assert ax.get_ylabel() == DISTANCE_AXIS and ax.get_xlabel() == "grid point"
    assert legend_texts(ax)[-1] == "median linearized robustness ρ̃ (CI)"
    assert_footer(fig, summary, "all")


# --- per image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("subset", ["all", "correct"])
def test_per_image_facets_show_each_grid_points_images_of_the_subset(lambdas, subset: str) -> None:  # noqa: ANN001
    summary = load(lambdas)
    fig = FIGURES["alignment_vs_robustness_per_image"](inputs_of(lambdas, subset))
    points = grid_points_of(summary, GRADNORM)
    assert [ax.get_title() for ax in fig.axes] == ["λ=0", "λ=0.01", "λ=0.1"]
    keep = summary["in_subset"].sel(subset=subset)
    largest = 0.0
    for ax, point in zip(fig.axes, points, strict=True):
        models = summary.sel(model=summary["setting"] == point)
        mask = keep.sel(model=models["model"]).values & np.isfinite(models["robustness"].values)
        expected = sorted(zip(models["robustness"].values[mask], models["alignment"].values[mask]))
        (scatter,) = ax.collections
        np.testing.assert_array_equal(sorted(map(tuple, scatter.get_offsets())), expected)
        largest = max(largest, float(np.max(expected)))
    (identity,) = line_points(fig.axes[0], linestyle="--")
    np.testing.assert_array_equal(identity, [[0, 0], [largest * 1.05, largest * 1.05]])
    assert fig.get_supxlabel() == f"robustness ρ(x) ({DISTANCE})"
    assert fig.axes[0].get_xlabel() == "ρ(x)" and fig.axes[0].get_ylabel() == f"α(x) ({DISTANCE})"
    assert_footer(fig, summary, subset)


# --- the saliency gallery ----------------------------------------------------------------------


def first_of_each_class(labels: np.ndarray, n: int) -> list[int]:
    """The gallery's images: the first image of each class by index, then the next images in order."""
    firsts = sorted(int(np.argmax(labels == c)) for c in set(labels.tolist()))[:n]
    return firsts + [i for i in range(len(labels)) if i not in firsts][: n - len(firsts)]


def assert_gallery(fig: plt.Figure, inputs: FigureInputs, rows: list[tuple[str, str, str]], rgb: bool = False) -> None:
    """The top row shows the evaluation images the gallery picks, titled with their class; each
    further row shows one model's map of one attribution, ``(model, attribution, label)``,
    scaled symmetrically to its own largest magnitude (RGB: a signed and a magnitude row)."""
    eval_ds = inputs.eval_ds
    samples = first_of_each_class(eval_ds["label"].values, inputs.options["gallery_samples"])
    kinds = ("signed", "magnitude") if rgb else ("signed",)
    axes = np.array(fig.axes[:-1]).reshape(1 + len(rows) * len(kinds), len(samples))  # the last axes: the colorbar
    offset = np.asarray(eval_ds.attrs["pixel_offset"], dtype=np.float32).reshape(-1, 1, 1)
    for ax, sample in zip(axes[0], samples, strict=True):
        pixels = eval_ds["images"].values[sample] + offset
        (image,) = ax.get_images()
        np.testing.assert_array_equal(image.get_array(), np.moveaxis(pixels, 0, -1).clip(0, 1) if rgb else pixels[0])
        assert ax.get_title() == eval_ds.attrs["class_names"][int(eval_ds["label"].values[sample])]
    for r, (model, attribution, label) in enumerate(rows):
        store = inputs.saliency[model]
        maps = store["saliency"] if attribution == GRADIENT else store["attribution_map"].sel(attribution=attribution)
        for kind_index, kind in enumerate(kinds):
            row = axes[1 + r * len(kinds) + kind_index]
            # the gradient's signed row names the model's median edge correlation, the number to check it against
            edge = float(inputs.summary["model_median"].sel(model=model, subset=inputs.subset, quantity="edge_correlation"))
            named = f"\nedge r {edge:.2f}" if attribution == GRADIENT and kind == "signed" else ""
            assert row[0].get_ylabel() == label + (f"\n{kind}" if rgb else "") + named
            for ax, sample in zip(row, samples):
                g = maps.values[sample]
                expected = g.sum(axis=0) if kind == "signed" else np.linalg.norm(g, axis=0)
                (image,) = ax.get_images()
                np.testing.assert_array_equal(image.get_array(), expected)
                scale = float(np.abs(expected).max())
                assert image.get_clim() == ((-scale, scale) if kind == "signed" else (0, scale))


def test_the_gallery_shows_the_picked_images_and_the_maps_of_each_grid_points_first_healthy_model(lambdas) -> None:  # noqa: ANN001
    inputs = inputs_of(lambdas)
    fig = gallery.saliency_gallery(inputs)
    assert FIGURES["saliency_gallery"] is gallery.saliency_gallery
    assert first_of_each_class(LABELS, 6) == [0, 2, 4, 6, 8, 1]
    # lambda 0.01: seed 0 is degenerate, so seed 1's maps
    rows = [(model_name(GRADNORM, lam, seed), GRADIENT, f"λ={lam:g}\n(seed {seed})") for lam, seed in ((0.0, 0), (0.01, 1), (0.1, 0))]
    assert DEGENERATE == model_name(GRADNORM, 0.01, 0)
    assert_gallery(fig, inputs, rows)
    assert fig.get_suptitle() == (
        r"Saliency maps $\nabla\Psi^{F(x)}(x)$, one row per grid point by λ"
        "\n(edge r: the model's median correlation of |saliency| with the image's Sobel edges)"
    )


def test_a_long_gallery_shows_each_methods_extreme_strengths(lambdas, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(gallery, "GALLERY_ROWS", 2)
    inputs = inputs_of(lambdas, gallery_samples=3)
    rows = [(model_name(GRADNORM, lam, 0), GRADIENT, f"λ={lam:g}\n(seed 0)") for lam in (0.0, 0.1)]
    assert_gallery(gallery.saliency_gallery(inputs), inputs, rows)


def test_the_gallery_shows_every_attribution_map_of_both_methods(mixed) -> None:  # noqa: ANN001
    inputs = inputs_of(mixed, gallery_samples=4)
    points = [(GRADNORM, 0.0, "λ=0"), (GRADNORM, 1.0, "λ=1"), (ADVERSARIAL, 0.5, "PGD ε=0.5"), (ADVERSARIAL, 2.0, "PGD ε=2")]
    rows = [(model_name(m, strength, 0), a, f"{ATTRIBUTION_LABELS[a]}\n{label}\n(seed 0)") for a in ATTRIBUTIONS for m, strength, label in points]
    fig = gallery.saliency_gallery(inputs)
    assert_gallery(fig, inputs, rows)
    assert fig.get_suptitle() == "Attribution maps of the predicted logit (signed), one row per (method, grid point)"


def test_rgb_maps_get_a_signed_and_a_magnitude_row(lambdas) -> None:  # noqa: ANN001
    rng = np.random.default_rng(7)
    images = rng.random((N, 3, 8, 8)).astype(np.float32)
    names = [f"class {k}" for k in range(10)]
    eval_ds = eval_dataset(images, LABELS, np.arange(N), CIFAR10_INPUT_SPACE, class_names=names)
    summary = load(lambdas)
    saliency = {str(m): xr.Dataset({"saliency": (("sample", "channel", "y", "x"), rng.normal(size=(N, 3, 8, 8)))}) for m in summary["model"].values}
    inputs = FigureInputs(summary, {"subset": "all", "gallery_samples": 3}, eval_ds, saliency)
    rows = [(model_name(GRADNORM, lam, seed), GRADIENT, f"λ={lam:g}\n(seed {seed})") for lam, seed in ((0.0, 0), (0.01, 1), (0.1, 0))]
    assert_gallery(gallery.saliency_gallery(inputs), inputs, rows, rgb=True)


# --- the figure stage --------------------------------------------------------------------------


@pytest.mark.parametrize("figure", figure_list.FIGURE_NAMES)
def test_every_figure_is_drawn_as_png_and_pdf(mixed, figure: str) -> None:  # noqa: ANN001
    draw_figure(*mixed, figure)


def write_changed_summary(experiment: tuple[Path, list[str]], tmp_path: Path, change) -> Path:  # noqa: ANN001
    """A copy of the experiment's stores whose summary is ``change(summary)``."""
    root, _ = experiment
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("eval.zarr", "saliency", "models"):
        (copy / name).symlink_to(root / name)
    write_store(change(load(experiment)), copy / "summary.zarr")
    return copy


def test_a_figure_against_lambda_without_gradnorm_models_is_refused(mixed, tmp_path) -> None:  # noqa: ANN001
    def adversarial_only(summary: xr.Dataset) -> xr.Dataset:
        return summary.assign_coords(method=("model", np.array([ADVERSARIAL] * summary.sizes["model"], dtype=object)))

    copy = write_changed_summary(mixed, tmp_path, adversarial_only)
    with pytest.raises(PipelineError, match="drawn against lambda, and .* has no gradnorm model"):
        draw_figure(copy, mixed[1], "decomposition_terms")


def test_a_summary_that_does_not_say_its_confidence_level_is_refused(lambdas, tmp_path) -> None:  # noqa: ANN001
    def without_level(summary: xr.Dataset) -> xr.Dataset:
        config = json.loads(summary.attrs["config"])
        del config["confidence_level"]
        return summary.assign_attrs(config=json.dumps(config))

    copy = write_changed_summary(lambdas, tmp_path, without_level)
    with pytest.raises(StoreError, match="does not say the confidence level of its intervals") as info:
        draw_figure(copy, lambdas[1], "alignment_vs_robustness")
    assert "\n" not in str(info.value)
    assert plotting.confidence_level(load(lambdas)) == LEVEL


def test_the_concordance_figure_shows_each_stored_tau_with_its_interval(mixed) -> None:  # noqa: ANN001
    root, models = mixed
    concordance = xr.open_zarr(root / "concordance.zarr").load()
    fig = FIGURES["quality_concordance"](FigureInputs(load(mixed), {"subset": "all"}, concordance=concordance))
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(" (")[0] for ax in axes] == [ATTRIBUTION_LABELS.get(a, a) for a in ATTRIBUTIONS]
    cell = concordance.sel(subset="all", attribution=GRADIENT, ranking="max_sensitivity", ranking_other="alignment")
    expected = f"{float(cell['concordance_tau']):+.2f}\n[{float(cell['concordance_tau_ci_low']):+.2f}, {float(cell['concordance_tau_ci_high']):+.2f}]"
    assert expected in [t.get_text() for t in axes[0].texts]
    assert float(cell["concordance_tau"]) < 0  # the fake max-sensitivity falls as alignment grows
    n_cells = (len(RANKING_NAMES) - 1) * len(RANKING_NAMES) // 2
    assert len(axes[0].texts) == n_cells


def test_the_concordance_figure_without_its_store_is_refused(mixed) -> None:  # noqa: ANN001
    root, models = mixed
    with pytest.raises(PipelineError, match="needs the concordance store"):
        figure_stage(
            figure="quality_concordance",
            summary_store=root / "summary.zarr",
            eval_store=root / "eval.zarr",
            saliency_stores=[],
            outputs=[root / "x.png"],
            options={"subset": "all", "dpi": 60},
        )
