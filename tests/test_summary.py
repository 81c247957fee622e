"""The summary stage (stacking, statistics) and every figure, on synthetic metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from scipy.stats import spearmanr

from saliency_robustness.data import MNIST_INPUT_SPACE, eval_dataset
from saliency_robustness.errors import StoreError
from saliency_robustness.figures import FIGURES, figure_stage
from saliency_robustness.models import ModelSpec
from saliency_robustness.stores import write_store
from saliency_robustness.summary import read_test_accuracy, summary_stage

LAMBDAS = [0.0, 0.01, 0.1]
N = 30


def fake_metrics(lam: float, seed: int) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    robustness = rng.gamma(2.0, 0.5 + 5 * lam, N)
    robustness[:2] = np.nan  # two attack failures
    alignment = 0.5 * np.nan_to_num(robustness) + rng.normal(0, 0.05, N)
    angle, bias = rng.uniform(0, 1, N), rng.uniform(0, 0.3, N)
    per_image = {
        "alignment": alignment,
        "alignment_cosine": alignment / 9.0,
        "linearized_robustness": robustness * 1.1,
        "homogeneity": rng.uniform(0.2, 1.0, N),
        "bound_angle_term": angle,
        "bound_bias_term": bias,
        "bound_rhs": alignment + angle + bias,
        "robustness": robustness,
        "correct": rng.uniform(size=N) < 0.9,
    }
    return xr.Dataset(
        {k: ("sample", v, {"long_name": k, "units": "1"}) for k, v in per_image.items()},
        coords={"sample": np.arange(N)},
        attrs={"title": "metrics"},
    )


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("exp")
    models, metrics_paths, model_dirs = [], [], []
    for i, lam in enumerate(LAMBDAS):
        name = f"gradnorm-lambda{lam:g}"
        models.append(name)
        write_store(fake_metrics(lam, i), root / "metrics" / f"{name}.zarr")
        d = root / "models" / name
        d.mkdir(parents=True)
        (d / "spec.json").write_text(ModelSpec(name=name, architecture="mnist_cnn", lam=lam).to_json())
        (d / "test_accuracy.json").write_text(json.dumps({"test_accuracy": 0.99 - lam}))
        metrics_paths.append(root / "metrics" / f"{name}.zarr")
        model_dirs.append(d)
        saliency = xr.Dataset({"saliency": (("sample", "channel", "y", "x"), np.random.default_rng(i).normal(size=(N, 1, 8, 8)))})
        write_store(saliency, root / "saliency" / f"{name}.zarr")
    # listed in an order other than lambda's, to check the stacking sorts
    order = [2, 0, 1]
    summary_stage(
        models=[models[i] for i in order],
        metrics_stores=[metrics_paths[i] for i in order],
        model_dirs=[model_dirs[i] for i in order],
        output_zarr=root / "summary.zarr",
        output_csv=root / "summary.csv",
    )
    images = torch.rand(N, 1, 8, 8)
    write_store(eval_dataset(images, torch.arange(N) % 10, np.arange(N), MNIST_INPUT_SPACE), root / "eval.zarr")
    return root, models


def test_summary_stacks_models_by_lambda_with_options_as_coordinates(experiment) -> None:  # noqa: ANN001
    root, models = experiment
    summary = xr.open_zarr(root / "summary.zarr")
    assert list(summary["model"].values) == models
    assert list(summary["lam"].values) == LAMBDAS
    assert summary["alignment"].dims == ("model", "sample")
    assert summary["alignment"].attrs["units"] == "1"
    assert set(summary["sensitivity"].values) == {"loss"}
    np.testing.assert_allclose(summary["alignment"].sel(model=models[1]), fake_metrics(0.01, 1)["alignment"])


def test_summary_csv_statistics_match_direct_computation(experiment) -> None:  # noqa: ANN001
    root, models = experiment
    table = pd.read_csv(root / "summary.csv").set_index("model")
    for var in ("alignment", "alignment_cosine", "robustness", "linearized_robustness", "homogeneity"):
        for stat in ("median", "q25", "q75"):
            assert f"{var}_{stat}" in table.columns
    m = fake_metrics(0.1, 2)
    finite = m["robustness"].values[np.isfinite(m["robustness"].values)]
    row = table.loc[models[2]]
    assert row["robustness_median"] == pytest.approx(np.median(finite), rel=1e-5)
    assert row["robustness_q25"] == pytest.approx(np.quantile(finite, 0.25), rel=1e-5)
    ok = np.isfinite(m["robustness"].values)
    rho = spearmanr(m["alignment"].values[ok], m["robustness"].values[ok]).statistic
    assert row["spearman_alignment_robustness"] == pytest.approx(rho, rel=1e-5)
    assert row["attack_failures"] == 2 and row["n_images"] == N
    assert row["lambda"] == 0.1 and row["test_accuracy"] == pytest.approx(0.89)


@pytest.mark.parametrize("figure", sorted(FIGURES))
def test_every_figure_is_drawn_as_png_and_pdf(experiment, figure: str) -> None:  # noqa: ANN001
    root, models = experiment
    outputs = [root / "figures" / f"{figure}.png", root / "figures" / f"{figure}.pdf"]
    outputs[0].parent.mkdir(exist_ok=True)
    figure_stage(
        figure=figure,
        summary_store=root / "summary.zarr",
        eval_store=root / "eval.zarr",
        saliency_stores=[root / "saliency" / f"{m}.zarr" for m in models],
        outputs=outputs,
        options={"gallery_samples": 6, "dpi": 60},
    )
    assert outputs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[1].read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("content", [None, "{not json", '{"accuracy": 0.9}'])
def test_a_missing_or_corrupt_test_accuracy_is_a_one_line_store_error(tmp_path, content) -> None:  # noqa: ANN001
    if content is not None:
        (tmp_path / "test_accuracy.json").write_text(content)
    with pytest.raises(StoreError, match="cannot read the test accuracy") as info:
        read_test_accuracy(tmp_path)
    assert "\n" not in str(info.value)
