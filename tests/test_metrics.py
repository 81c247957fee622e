"""Every per-image quantity of docs/spec.md §2 against known answers, and the metrics store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch
import xarray as xr
from torch import nn

from conftest import (
    assert_within,
    decomposition_operands,
    decomposition_tolerance,
    float_tolerance,
    linearized_robustness_tolerance,
    quotient_tolerance,
    reduction_terms,
)
from saliency_robustness.architectures import resnet_small
from saliency_robustness.attributions import AttributionOptions
from saliency_robustness.errors import PipelineError, StoreError
from saliency_robustness.models import load_model
from saliency_robustness.stages.metrics import METRICS, compute_metrics, edge_correlation, metrics_stage, sobel_magnitude
from saliency_robustness.stages.saliency import saliency_stage
from saliency_robustness.stores import computed_from, open_store, write_store

SHAPE = (1, 4, 4)
D = int(np.prod(SHAPE))


def linear_model(weight: np.ndarray, bias: np.ndarray, dtype: torch.dtype = torch.float32) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))
    return nn.Sequential(nn.Flatten(), layer)


def binary_case(b: float) -> tuple[nn.Module, torch.Tensor, np.ndarray, np.ndarray]:
    """Logits (<x, z> + b, -<x, z> - b), and images with |<x, z>| and |<x, z> + b| away from 0."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=D)
    x = rng.normal(size=(20, D))
    x += np.sign(x @ z)[:, None] * z * (1 + abs(b)) / (z @ z)  # |<x, z>| >= 1 + |b|
    images = torch.tensor(x.reshape(-1, *SHAPE), dtype=torch.float32)
    x64 = images.double().flatten(1).numpy()
    return linear_model(np.stack([z, -z]), np.array([b, -b])), images, x64 @ z, z


def binary_tolerance(images: torch.Tensor, z: np.ndarray, b: float) -> tuple[np.ndarray, float]:
    """The float32 network of :func:`binary_case` against its float64 closed form: each logit ``<x, fl(z)> +- b`` is
    a float32 sum of D + 1 terms, with z rounded to float32 (one more rounding per term), so ``Psi† = 2 (<x, z> + b)``
    and ``<x, g†>`` err by at most the first value (per image); ``||g†|| = 2 ||fl(z)||``, ``||g||`` by the second
    (relative). A distance ``a / ||g†||`` (or ``(a / 2) / ||g||``) then errs by ``quotient_tolerance``."""
    x64 = images.double().flatten(1).numpy()
    return float_tolerance(torch.float32, 2 * (np.abs(x64) @ np.abs(z) + abs(b)), terms=D + 1), float_tolerance(torch.float32, 1.0)


def test_binary_linear_model_alignment_equals_linearized_robustness() -> None:
    model, images, xz, z = binary_case(0.0)
    ds = compute_metrics(model, images, device="cpu")
    expected = np.abs(xz) / np.linalg.norm(z)
    logit, norm = binary_tolerance(images, z, 0.0)
    distance = quotient_tolerance(logit, expected, 2 * np.linalg.norm(z), norm)
    assert_within(ds["linearized_robustness"].values, expected, distance)
    assert_within(ds["alignment"].values, expected, distance)
    assert_within(ds["homogeneity"].values, 1.0, quotient_tolerance(logit, 1.0, 2 * xz, logit / np.abs(2 * xz)))
    np.testing.assert_array_equal(ds["runner_up"].values, 1 - ds["prediction"].values)


def test_binary_linear_model_with_bias_separates_alignment_from_linearized_robustness() -> None:
    b = 1.5
    model, images, xz, z = binary_case(b)
    ds = compute_metrics(model, images, device="cpu")
    z_norm = np.linalg.norm(z)
    logit, norm = binary_tolerance(images, z, b)

    def assert_distance(name: str, expected: np.ndarray) -> None:
        assert_within(ds[name].values, expected, quotient_tolerance(logit, expected, 2 * z_norm, norm), err_msg=name)

    assert_distance("linearized_robustness", np.abs(xz + b) / z_norm)
    assert_distance("alignment", np.abs(xz) / z_norm)
    assert np.all(np.abs(ds["alignment"].values - ds["linearized_robustness"].values) > 0.5 * b / z_norm)
    # Psi† = 2 |<x, z> + b|, g† = 2 s z with s = sign(<x, z> + b): beta† = 2 s b
    assert_within(ds["bias_part"].values, 2 * np.sign(xz + b) * b, logit)
    # biases (b, -b) times derivatives +-(1, -1), all exact in float32: a float64 sum of 2 terms, 2 s b
    assert_within(ds["bias_sum"].values, 2 * np.sign(xz + b) * b, float_tolerance(np.float64, 2 * b, terms=2))
    # signed terms of rho~ = (<x, g†> + beta†) / ||g†||, ||g†|| = 2 ||z||: signs kept, not absolute values
    s = np.sign(xz + b)
    assert_distance("homogeneous_term", s * xz / z_norm)
    assert_distance("bias_term_signed", s * b / z_norm)
    assert (ds["bias_term_signed"].values < 0).any() and (ds["bias_term_signed"].values > 0).any()


@pytest.mark.parametrize("class_chunk", [3, 10, 100])
def test_affine_model_linearized_robustness_is_the_distance_to_the_nearest_boundary(class_chunk: int) -> None:
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(10, D)), rng.normal(size=10)
    x = rng.normal(size=(30, D))
    model = linear_model(weight, bias, torch.float64)
    ds = compute_metrics(model, torch.tensor(x.reshape(-1, *SHAPE)), batch_size=7, class_chunk=class_chunk)
    logits = x @ weight.T + bias
    # float64 rounding on both sides: a logit is a sum of D + 1 terms, <x, g†> one of D terms of g† = w_i - w_j (one
    # more rounding each); a norm, a unit vector g / ||g|| and a quotient are relatively exact to that of D + 1 terms
    logit_operands = np.abs(x) @ np.abs(weight).T + np.abs(bias)
    relative = float_tolerance(np.float64, 1.0, terms=D + 1)
    bias_sum_tolerance = np.zeros(len(x))
    for k in range(len(x)):
        i = logits[k].argmax()
        ratios = [(logits[k, i] - logits[k, j]) / np.linalg.norm(weight[i] - weight[j]) if j != i else np.inf for j in range(10)]
        j = np.argmin(ratios)
        assert ds["prediction"].values[k] == i
        assert ds["runner_up"].values[k] == j
        margin = float_tolerance(np.float64, logit_operands[k, i] + logit_operands[k, j], terms=D + 2)
        bias_sum_tolerance[k] = margin
        rho = ds["linearized_robustness"].values[k]
        assert_within(rho, ratios[j], quotient_tolerance(margin, rho, np.linalg.norm(weight[i] - weight[j]), relative))
        # g = w_i, g† = w_i - w_j*
        g, g_dagger = weight[i], weight[i] - weight[j]
        alignment = abs(x[k] @ g) / np.linalg.norm(g)
        inner = float_tolerance(np.float64, np.abs(x[k]) @ np.abs(g), terms=D)
        assert_within(ds["alignment"].values[k], alignment, quotient_tolerance(inner, alignment, np.linalg.norm(g), relative))
        angle = np.linalg.norm(x[k]) * np.linalg.norm(g_dagger / np.linalg.norm(g_dagger) - g / np.linalg.norm(g))
        # ||x|| ||u - v|| with unit vectors u, v each within `relative` (normwise), and two more norms
        assert_within(ds["bound_angle_term"].values[k], angle, 2 * (np.linalg.norm(x[k]) + angle) * relative)
        homogeneous = float_tolerance(np.float64, np.abs(x[k]) @ (np.abs(weight[i]) + np.abs(weight[j])), terms=D + 1)
        assert_within(ds["homogeneous_part"].values[k], x[k] @ g_dagger, homogeneous)
    # an affine model is exactly its linearization: the remainder Psi† - <x, g†> is beta† = b_i - b_j everywhere
    assert_within(ds["bias_sum"].values, ds["bias_part"].values, bias_sum_tolerance)


def test_constant_model_has_infinite_linearized_robustness_and_the_second_logit_as_runner_up() -> None:
    bias = np.array([0.3, 2.0, -1.0, 1.2])
    ds = compute_metrics(linear_model(np.zeros((4, D)), bias), torch.randn(3, *SHAPE))
    assert np.all(np.isinf(ds["linearized_robustness"].values))
    np.testing.assert_array_equal(ds["prediction"].values, 1)
    np.testing.assert_array_equal(ds["runner_up"].values, 3)


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Running statistics and affine parameters far from their initial 0 / 1."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator))
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            if module.affine:
                with torch.no_grad():
                    module.weight.copy_(torch.randn(c, generator=generator))
                    module.bias.copy_(torch.randn(c, generator=generator))
    return model


def relu_cnn(batchnorm: bool) -> nn.Module:
    """Conv/ReLU/max-pool with biases larger than at initialization, optionally with eval-mode batch norm
    (affine and not, after convolutions and after a dense layer, followed by in-place ReLUs)."""
    torch.manual_seed(3)
    norm2d = (lambda c, affine=True: nn.BatchNorm2d(c, affine=affine)) if batchnorm else (lambda c, affine=True: nn.Identity())
    norm1d = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        norm2d(6),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=not batchnorm),
        norm2d(8, affine=False),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 16),
        norm1d,
        nn.ReLU(),
        nn.Linear(16, 5),
    )
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.5)
    return randomize_batchnorm(model, seed=4)


def assert_decomposition_exact(ds: xr.Dataset, model: nn.Module, images: torch.Tensor) -> None:
    bias_part, bias_sum = ds["bias_part"].values, ds["bias_sum"].values
    tolerance = decomposition_tolerance(ds, model, images)
    assert_within(bias_sum, bias_part, tolerance)
    # the biases matter: a bias sum of zero would fail the comparison above
    assert np.median(np.abs(bias_part)) > 0.05 * np.median(np.abs(ds["logit_margin"].values))
    assert ds.attrs["max_decomposition_error"] == np.abs(bias_part - bias_sum).max()  # the same arrays, the same arithmetic
    scale = np.abs(ds["homogeneous_part"].values) + np.abs(bias_part)  # what the relative error is relative to
    assert ds.attrs["max_relative_decomposition_error"] <= (tolerance / scale).max()


@pytest.mark.parametrize("batchnorm", [False, True], ids=["relu-maxpool-bias", "eval-batchnorm"])
def test_homogeneous_decomposition_remainder_equals_bias_sum(batchnorm: bool) -> None:
    images = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    model = relu_cnn(batchnorm)
    ds = compute_metrics(model.train(), images, batch_size=5)  # train mode on entry: must switch to eval
    assert_decomposition_exact(ds, model, images)
    assert "decomposition_unverified_modules" not in ds.attrs


def test_homogeneous_decomposition_of_a_resnet_with_residuals_and_inplace_relus() -> None:
    torch.manual_seed(6)
    model = randomize_batchnorm(resnet_small(in_channels=3, num_classes=10, image_size=32), seed=7)
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    assert_decomposition_exact(compute_metrics(model, images, batch_size=4), model, images)


def test_decomposition_error_is_reported_for_a_non_homogeneous_model() -> None:
    torch.manual_seed(9)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 3))
    ds = compute_metrics(model, torch.randn(6, *SHAPE))
    assert ds.attrs["decomposition_unverified_modules"] == ["Tanh"]
    # not a rounding tolerance: tanh is far from homogeneous, its error is O(1), rounding's below 1e-4 (relative)
    assert ds.attrs["max_relative_decomposition_error"] > 1e-3


def test_batch_statistics_batchnorm_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(PipelineError, match="batch statistics"):
        compute_metrics(model, torch.randn(2, 1, 4, 4))


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten class templates plus noise, in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (n,), generator=generator)
    return (templates[labels] + 0.3 * torch.randn(n, 1, 8, 8, generator=generator)).clamp(0, 1), labels


@pytest.fixture(scope="module")
def trained_model() -> nn.Module:
    torch.manual_seed(10)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        x, y = synthetic_digits(64, seed=step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_metrics(trained_model: nn.Module) -> tuple[xr.Dataset, torch.Tensor, torch.Tensor]:
    images, labels = synthetic_digits(40, seed=1000)
    return compute_metrics(trained_model, images, batch_size=64), images, labels


def test_bound_holds_for_every_image_of_a_trained_model(trained_model: nn.Module, trained_metrics) -> None:  # noqa: ANN001
    ds, images, labels = trained_metrics
    assert (ds["prediction"].values == labels.numpy()).mean() > 0.5, "the model should have learned something"
    rho = ds["linearized_robustness"].values
    # exact for rho~ = |Psi†| / ||g†|| with g† from one reverse pass; rho~ divides by ||g_i* - g_j*|| from two: rounding apart
    assert np.all(ds["bound_rhs"].values >= rho - linearized_robustness_tolerance(ds, trained_model, images))
    parts = ds["alignment"] + ds["bound_angle_term"] + ds["bound_bias_term"]
    assert_within(ds["bound_rhs"].values, parts.values, float_tolerance(np.float64, parts.values, terms=3))  # float64 sum of 3


def test_linearized_robustness_is_binarized_logit_over_its_gradient_norm(trained_model: nn.Module, trained_metrics) -> None:  # noqa: ANN001
    """Recomputed here in one batch, by another code path: equal to the rounding of the float32 network."""
    ds, images, _ = trained_metrics
    tolerance = rounding_tolerances(trained_model, images, ds)
    x = images.clone().requires_grad_(True)
    logits = trained_model(x)
    rows = torch.arange(len(x))
    prediction, runner_up = torch.as_tensor(ds["prediction"].values), torch.as_tensor(ds["runner_up"].values)
    binarized = logits[rows, prediction] - logits[rows, runner_up]
    (g_dagger,) = torch.autograd.grad(binarized.sum(), x)
    g_norm = g_dagger.flatten(1).double().norm(dim=1).numpy()
    assert_within(ds["logit_margin"].values, binarized.detach().double().numpy(), tolerance["logit_margin"])
    assert_within(ds["linearized_robustness"].values, ds["logit_margin"].values / g_norm, tolerance["linearized_robustness"])
    assert_within(ds["bound_bias_term"].values, np.abs(ds["bias_part"].values) / g_norm, tolerance["bound_bias_term"])
    homogeneous = (x.detach().flatten(1).double() * g_dagger.flatten(1).double()).sum(1).numpy()
    assert_within(ds["homogeneous_part"].values, homogeneous, tolerance["homogeneous_part"])
    assert_within(ds["homogeneity"].values, homogeneous / ds["logit_margin"].values, tolerance["homogeneity"])


def test_linearized_robustness_is_homogeneous_term_plus_signed_bias_term(trained_model: nn.Module, trained_metrics) -> None:  # noqa: ANN001
    ds, images, _ = trained_metrics
    h, b = ds["homogeneous_term"].values, ds["bias_term_signed"].values
    # (<x, g†> + (Psi† - <x, g†>)) / ||g†|| in float64, against Psi† / ||g_i* - g_j*|| (two reverse passes, float32)
    tolerance = linearized_robustness_tolerance(ds, trained_model, images) + float_tolerance(np.float64, np.abs(h) + np.abs(b), terms=2)
    assert_within(h + b, ds["linearized_robustness"].values, tolerance)
    # IEEE division is sign-symmetric: |a / c| == |a| / c exactly
    np.testing.assert_array_equal(np.abs(ds["bias_term_signed"].values), ds["bound_bias_term"].values)


def test_alignment_cosine_is_alignment_over_image_norm(trained_metrics) -> None:  # noqa: ANN001
    ds, images, _ = trained_metrics
    image_norm = images.flatten(1).double().norm(dim=1).numpy()
    # the same float64 norm, perhaps summed in another order, and one division: relative rounding of D + 1 terms
    cosine_tolerance = float_tolerance(np.float64, ds["alignment_cosine"].values, terms=images[0].numel() + 1)
    assert_within(ds["alignment_cosine"].values, ds["alignment"].values / image_norm, cosine_tolerance)


def rounding_tolerances(model: nn.Module, images: torch.Tensor, ds: xr.Dataset) -> dict[str, np.ndarray]:
    """Per image, how far each float metric of ``ds`` may move when the float32 network runs in another order
    (batch size, class chunk, kernel blocking, another code path): only the network's float32 outputs are rounded
    differently, the float64 formulas after them are the same. Their rounding scales with their operands
    (:func:`decomposition_operands`, :func:`float_tolerance`): the logit-unit quantities with those of ``Psi†`` and
    its decomposition; a gradient (normwise) with its norm, ``g† = g_i* - g_j*`` with ``||g_i*|| + ||g_j*||``."""
    operands = decomposition_operands(model, images, ds["prediction"].values, ds["runner_up"].values)
    terms = reduction_terms(model)
    logit = float_tolerance(torch.float32, operands["logit"], terms=terms)
    g_relative = float_tolerance(torch.float32, 1.0, terms=terms)  # of ||g|| and of g's direction
    dagger_relative = float_tolerance(torch.float32, operands["g_pair"], terms=terms) / operands["g_dagger"]  # of g†
    v = {name: np.abs(ds[name].values) for name in METRICS}
    x_norm = operands["x"]
    alignment = (x_norm + v["alignment"]) * g_relative  # |<x, g>| / ||g||: |d<x, g>| <= ||x|| ||dg||
    over_dagger = {
        name: quotient_tolerance(logit, v[name], operands["g_dagger"], dagger_relative)
        for name in ("linearized_robustness", "homogeneous_term", "bias_term_signed", "bound_bias_term")
    }
    angle = 2 * x_norm * (g_relative + dagger_relative)  # ||x|| ||g†/||g†|| - g/||g|||: a unit vector moves by <= 2 ||dg|| / ||g||
    # the Pearson correlation of m = sum_c |g_c| with fixed edges: the centred m's direction moves by <= 2 ||dm|| / ||m - mean||,
    # and ||dm|| <= sqrt(channels) ||dg||
    x = images.clone().requires_grad_(True)
    predicted = torch.as_tensor(ds["prediction"].values).view(-1, 1)
    g = torch.autograd.grad(model(x).gather(1, predicted).sum(), x)[0].double().flatten(1)
    mass = g.view_as(x).abs().sum(dim=1).flatten(1)
    centred = torch.linalg.vector_norm(mass - mass.mean(dim=1, keepdim=True), dim=1)
    edge = (2 * images.shape[1] ** 0.5 * g_relative * torch.linalg.vector_norm(g, dim=1) / centred).numpy()
    return {
        "edge_correlation": edge,
        "logit_margin": logit,
        "homogeneous_part": logit,
        "bias_part": logit,
        "bias_sum": logit,
        "homogeneity": quotient_tolerance(logit, v["homogeneity"], v["logit_margin"], logit / v["logit_margin"]),
        "alignment": alignment,
        "alignment_cosine": alignment / x_norm,
        "bound_angle_term": angle,
        "bound_rhs": alignment + angle + over_dagger["bound_bias_term"],
        **over_dagger,
    }


def test_metrics_do_not_depend_on_batch_size(trained_model: nn.Module, trained_metrics) -> None:  # noqa: ANN001
    ds, images, _ = trained_metrics
    other = compute_metrics(trained_model, images, batch_size=7, class_chunk=4)
    np.testing.assert_array_equal(other["prediction"].values, ds["prediction"].values)
    np.testing.assert_array_equal(other["runner_up"].values, ds["runner_up"].values)
    tolerance = rounding_tolerances(trained_model, images, ds)
    assert set(tolerance) == set(METRICS) - {"prediction", "runner_up"}
    for name, tol in tolerance.items():
        assert_within(other[name].values, ds[name].values, tol, err_msg=name)


@pytest.fixture()
def stores(tiny_experiment: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    saliency = tmp_path / "saliency.zarr"
    saliency_stage(model_dir=tiny_experiment["model_dir"], eval_store=tiny_experiment["eval"], output=saliency, batch_size=5)
    return {**tiny_experiment, "saliency": saliency, "output": tmp_path / "metrics" / "gradnorm-lambda0.zarr"}


def run_metrics_stage(stores: dict[str, Path], attack_stores: dict[str, str] | None = None, saliency: Path | None = None) -> xr.Dataset:
    metrics_stage(
        model_dir=stores["model_dir"],
        eval_store=stores["eval"],
        saliency_store=saliency or stores["saliency"],
        attack_stores=attack_stores or {},
        output=stores["output"],
        batch_size=5,
        class_chunk=4,
    )
    return xr.open_zarr(stores["output"])


def test_metrics_stage_writes_a_labelled_store(stores: dict[str, Path]) -> None:
    ds = run_metrics_stage(stores)
    eval_ds = xr.open_zarr(stores["eval"])
    attribution = {"attribution_alignment", "attribution_alignment_cosine"}
    assert set(ds.data_vars) == set(METRICS) | {"label", "correct"} | attribution
    assert all(ds[name].dims == ("sample",) for name in set(ds.data_vars) - attribution)
    # the gradient's row of the per-method alignment is the paper's alignment, from the saliency stage's own float32
    # reverse passes (other batches): |<x, g>| / ||g|| moves by (||x|| + alignment) ||dg|| / ||g|| (see rounding_tolerances)
    model = load_model(stores["model_dir"])
    images = torch.from_numpy(eval_ds["images"].values)
    alignment = ds["alignment"].values
    g_relative = float_tolerance(torch.float32, 1.0, terms=reduction_terms(model))
    tolerance = (images.flatten(1).double().norm(dim=1).numpy() + alignment) * g_relative
    assert_within(ds["attribution_alignment"].sel(attribution="gradient").values, alignment, tolerance)
    for name in ds.data_vars:
        assert ds[name].attrs.get("units") and ds[name].attrs.get("long_name"), name
    np.testing.assert_array_equal(ds["label"].values, eval_ds["label"].values)
    np.testing.assert_array_equal(ds["correct"].values, ds["prediction"].values == eval_ds["label"].values)
    np.testing.assert_array_equal(ds["prediction"].values, xr.open_zarr(stores["saliency"])["prediction"].values)
    scale = np.abs(ds["homogeneous_part"].values) + np.abs(ds["bias_part"].values)  # what the relative error is relative to
    assert ds.attrs["max_relative_decomposition_error"] <= (decomposition_tolerance(ds, model, images) / scale).max()
    assert ds.attrs["model"] == "gradnorm-lambda0" and "class_chunk" in ds.attrs["config"]


def test_metrics_stage_refuses_a_saliency_store_of_another_model(stores: dict[str, Path], tmp_path: Path) -> None:
    saliency = open_store(stores["saliency"]).load()
    saliency["logits"] = saliency["logits"].roll({"class": 1})
    saliency["prediction"] = saliency["logits"].argmax("class")
    write_store(saliency, tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="disagrees with the model on the prediction of 12 of 12"):
        run_metrics_stage(stores, saliency=tmp_path / "other.zarr")


def test_metrics_stage_merges_the_attack_ensembles_robustness(stores: dict[str, Path], tmp_path: Path) -> None:
    """Through the real ``combine_attacks``: the smallest verified norm, which attack gave it,
    and every attack's own norm along ``attack``; NaN (no adversarial) never wins."""
    samples = np.arange(12)
    paths = {}
    for k, name in enumerate(["ddn", "fmn"]):
        values = np.linspace(0.1, 1.2, 12) + k
        if name == "ddn":
            values[3] = np.nan  # DDN found nothing for image 3: FMN's norm is rho there
        norm = xr.DataArray(values, dims="sample", coords={"sample": samples}, attrs={"units": "1", "long_name": "norm"})
        source = computed_from(model_dir=stores["model_dir"], eval_store=stores["eval"], attack=name)
        attack = xr.Dataset({"perturbation_norm": norm}, attrs={"computed_from": json.dumps(source)})
        paths[name] = str(write_store(attack, tmp_path / f"{name}.zarr"))
    ds = run_metrics_stage(stores, attack_stores=paths)
    expected = np.linspace(0.1, 1.2, 12)
    expected[3] += 1
    np.testing.assert_array_equal(ds["robustness"].values, expected)  # the very numbers written above, picked, not computed
    assert list(ds["robustness_attack"].values[[0, 3]]) == ["ddn", "fmn"]
    assert set(ds["attack_perturbation_norm"].dims) == {"attack", "sample"}
    assert ds["attack_perturbation_norm"].sizes["attack"] == 2
    assert ds["robustness"].attrs["units"] == "input-space L2 distance"


def test_metrics_refuse_an_attack_store_of_another_model_or_attack(stores: dict[str, Path], tmp_path: Path) -> None:
    """An attack store copied from another model (or renamed from another attack) was read as
    this model's; it is refused in one line naming what it was computed from."""
    norm = xr.DataArray(np.linspace(0.1, 1.2, 12), dims="sample", coords={"sample": np.arange(12)})
    source = computed_from(model_dir=stores["model_dir"], eval_store=stores["eval"], attack="ddn")
    for key, value in (("model", "gradnorm-lambda0-seed0"), ("model_digest", "0" * 32), ("eval_digest", "0" * 32), ("attack", "fmn")):
        attrs = {"computed_from": json.dumps({**source, key: value})}
        path = write_store(xr.Dataset({"perturbation_norm": norm}, attrs=attrs), tmp_path / key / "ddn.zarr")
        with pytest.raises(StoreError, match=f"store {path} was computed from {key} '{value}', not '{source[key] if key != 'attack' else 'ddn'}'"):
            run_metrics_stage(stores, attack_stores={"ddn": str(path)})


def test_every_attribution_maps_alignment_is_measured_against_the_same_image(stores: dict[str, Path], tmp_path: Path) -> None:
    """|<x, a>| / ||a|| and its cosine, recomputed here from the stored maps and images, for
    every method of the saliency store, with the IG completeness error carried over."""
    saliency = tmp_path / "all-methods.zarr"
    options = AttributionOptions(
        methods=["smoothgrad", "integrated_gradients"], smoothgrad={"n": 4, "sigma": 0.1}, integrated_gradients={"baseline": "zero", "steps": 32}
    )
    saliency_stage(model_dir=stores["model_dir"], eval_store=stores["eval"], output=saliency, batch_size=5, attributions=options)
    ds = run_metrics_stage(stores, saliency=saliency)
    maps = xr.open_zarr(saliency)["attribution_map"]
    x = xr.open_zarr(stores["eval"])["images"].values.reshape(ds.sizes["sample"], -1).astype(np.float64)
    assert list(ds["attribution"].values) == ["gradient", "smoothgrad", "integrated_gradients"]
    d = x.shape[1]
    relative = float_tolerance(np.float64, 1.0, terms=d + 1)  # of a float64 norm of d terms and a division, in another order
    x_norm = np.linalg.norm(x, axis=1)
    for method in ds["attribution"].values:
        a = maps.sel(attribution=method).values.reshape(len(x), -1).astype(np.float64)
        a_norm = np.linalg.norm(a, axis=1)
        expected = np.abs((x * a).sum(axis=1)) / a_norm
        inner = float_tolerance(np.float64, np.abs(x * a).sum(axis=1), terms=d)  # <x, a>: d terms in another order
        alignment = quotient_tolerance(inner, expected, a_norm, relative)
        assert_within(ds["attribution_alignment"].sel(attribution=method).values, expected, alignment, err_msg=method)
        cosine = expected / x_norm
        assert_within(
            ds["attribution_alignment_cosine"].sel(attribution=method).values,
            cosine,
            quotient_tolerance(alignment, cosine, x_norm, relative),
            err_msg=method,
        )
    np.testing.assert_array_equal(ds["ig_completeness_error"].values, xr.open_zarr(saliency)["ig_completeness_error"].values)


# --- the saliency map's share on the image's edges (edge_correlation) ---------------------------


def test_sobel_magnitude_of_a_step_edge_is_four_on_its_two_columns_and_zero_elsewhere() -> None:
    step = torch.zeros(1, 3, 8, 8)
    step[..., 4:] = 1.0  # a vertical edge between columns 3 and 4, in every channel
    expected = torch.zeros(1, 8, 8, dtype=torch.float64)
    expected[..., 3:5] = 4.0  # (1 + 2 + 1) x the unit step; the replicated border adds no edge
    torch.testing.assert_close(sobel_magnitude(step), expected, rtol=0, atol=0)
    torch.testing.assert_close(sobel_magnitude(step.transpose(2, 3)), expected.transpose(1, 2), rtol=0, atol=0)


def test_sobel_magnitude_is_scipys_sobel_of_the_channel_mean() -> None:
    """An outside reference: scipy.ndimage.sobel along both axes, border mode nearest."""
    x = torch.rand(2, 3, 12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gray = x.mean(dim=1).numpy()
    reference = [np.hypot(scipy.ndimage.sobel(g, axis=1, mode="nearest"), scipy.ndimage.sobel(g, axis=0, mode="nearest")) for g in gray]
    np.testing.assert_allclose(sobel_magnitude(x).numpy(), np.stack(reference), rtol=1e-12, atol=1e-12)


def test_edge_correlation_is_one_on_the_edges_minus_one_off_them_and_ignores_the_mean() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    edges = sobel_magnitude(x)[:, None].expand(-1, 3, -1, -1) / 3  # |saliency| summed over channels = the edge map
    sign = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0).double()
    torch.testing.assert_close(edge_correlation(x, sign * edges), torch.ones(3, dtype=torch.float64))
    off = edges.amax() - edges  # all the mass where the edges are weakest
    torch.testing.assert_close(edge_correlation(x, off), -torch.ones(3, dtype=torch.float64))
    # the centered image (the input space subtracts a per-channel mean) has the same edges
    shifted = x - torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64).view(1, 3, 1, 1)
    torch.testing.assert_close(edge_correlation(shifted, sign * edges), edge_correlation(x, sign * edges))
    assert torch.isnan(edge_correlation(x, torch.ones_like(x))).all()  # a constant map has no correlation
