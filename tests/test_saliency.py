"""Saliency maps: the gradient of the predicted-class logit, and the saliency store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from conftest import assert_within, float_tolerance, reduction_terms, tanh_mlp_operands
from saliency_robustness.attributions import AttributionOptions
from saliency_robustness.data import InputSpace
from saliency_robustness.models import load_model
from saliency_robustness.stages.saliency import compute_saliency, saliency_stage


def smooth_model() -> nn.Module:
    """A float64 tanh MLP whose predictions differ between inputs."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def central_differences(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, eps: float = 1e-6) -> np.ndarray:
    """``d Psi^{classes[k]}(x_k) / d x_k`` one input coordinate at a time."""
    grads = np.zeros(x.shape)
    with torch.no_grad():
        for k in range(len(x)):
            for idx in np.ndindex(*x.shape[1:]):
                up, down = x[k : k + 1].clone(), x[k : k + 1].clone()
                up[(0, *idx)] += eps
                down[(0, *idx)] -= eps
                grads[(k, *idx)] = (model(up)[0, classes[k]] - model(down)[0, classes[k]]).item() / (2 * eps)
    return grads


def test_saliency_equals_central_finite_differences_of_the_predicted_logit() -> None:
    model = smooth_model()
    x = torch.randn(8, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ds = compute_saliency(model, x, batch_size=3, device="cpu")
    with torch.no_grad():
        logits = model(x)
    prediction = logits.argmax(dim=1)
    assert len(set(prediction.tolist())) > 1, "the test needs inputs with different predicted classes"
    np.testing.assert_array_equal(ds["prediction"].values, prediction.numpy())
    logit_operands, _, terms = tanh_mlp_operands(model, x)
    assert_within(ds["logits"].values, logits.numpy(), float_tolerance(torch.float64, logit_operands, terms=terms))  # other batches
    # not a rounding tolerance: central differences with step 1e-6 err by h^2 |f^(3)| / 6 ~ 1e-12 (truncation) plus
    # eps |Psi| / h ~ 1e-10 (rounding of the difference)
    np.testing.assert_allclose(ds["saliency"].values, central_differences(model, x, prediction), rtol=1e-6, atol=1e-9)


def test_saliency_runs_in_eval_mode_and_leaves_model_and_images_as_they_were() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))
    x = torch.randn(6, 1, 3, 4)
    before = x.clone()
    model.train()
    first = compute_saliency(model, x, device="cpu")
    second = compute_saliency(model, x, device="cpu")  # dropout active would make these differ
    xr.testing.assert_equal(first, second)
    assert model.training and all(m.training for m in model.modules())
    assert not x.requires_grad and torch.equal(x, before)


def test_saliency_does_not_depend_on_batch_size() -> None:
    model = smooth_model()
    x = torch.randn(10, 1, 3, 4, dtype=torch.float64)
    small, large = compute_saliency(model, x, batch_size=3), compute_saliency(model, x, batch_size=64)
    assert set(small.variables) == set(large.variables)
    np.testing.assert_array_equal(small["prediction"].values, large["prediction"].values)
    logit_operands, gradient_operands, terms = tanh_mlp_operands(model, x)
    assert_within(small["logits"].values, large["logits"].values, float_tolerance(torch.float64, logit_operands, terms=terms))
    gradient = float_tolerance(torch.float64, gradient_operands[np.arange(len(x)), large["prediction"].values], terms=terms)
    assert_within(small["saliency"].values, large["saliency"].values, gradient.reshape(x.shape))
    assert_within(small["attribution_map"].values, large["attribution_map"].values, gradient.reshape(1, *x.shape))


def test_saliency_stage_writes_a_labelled_store(tiny_experiment: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "saliency" / "gradnorm-lambda0.zarr"
    saliency_stage(model_dir=tiny_experiment["model_dir"], eval_store=tiny_experiment["eval"], output=output, batch_size=5)
    ds = xr.open_zarr(output)
    eval_ds = xr.open_zarr(tiny_experiment["eval"])
    assert set(ds.data_vars) == {"saliency", "attribution_map", "logits", "prediction", "label"}
    assert list(ds["attribution"].values) == ["gradient"]  # the default: the paper's map only
    np.testing.assert_array_equal(ds["attribution_map"].sel(attribution="gradient").values, ds["saliency"].values)
    assert ds["saliency"].dims == ("sample", "channel", "y", "x")
    assert ds["logits"].dims == ("sample", "class")
    for name, var in ds.variables.items():
        if name in ds.data_vars:
            assert var.attrs.get("units") and var.attrs.get("long_name"), name
    np.testing.assert_array_equal(ds["label"].values, eval_ds["label"].values)
    np.testing.assert_array_equal(ds["sample"].values, eval_ds["sample"].values)
    assert list(ds["class_name"].values) == eval_ds.attrs["class_names"]
    assert ds.attrs["model"] == "gradnorm-lambda0" and "git_commit" in ds.attrs and "batch_size" in ds.attrs["config"]
    model = load_model(tiny_experiment["model_dir"])
    expected = compute_saliency(model, eval_ds["images"].values, device="cpu")
    # other batches of a float32 ReLU network: its gradients round normwise at the scale of their norm
    norm = np.linalg.norm(expected["saliency"].values.reshape(len(eval_ds["sample"]), -1), axis=1)
    tolerance = float_tolerance(torch.float32, norm, terms=reduction_terms(model))
    assert_within(ds["saliency"].values, expected["saliency"].values, tolerance.reshape(-1, 1, 1, 1))
    np.testing.assert_array_equal(ds["prediction"].values, expected["prediction"].values)


def test_saliency_rejects_images_without_four_dims() -> None:
    with pytest.raises(ValueError, match="sample, channel, y, x"):
        compute_saliency(smooth_model(), torch.zeros(3, 12, dtype=torch.float64))


# --- attribution methods through Captum (docs/spec.md §2) ---

ALL_METHODS = AttributionOptions(
    methods=["smoothgrad", "integrated_gradients"], smoothgrad={"n": 25, "sigma": 0.15}, integrated_gradients={"baseline": "zero", "steps": 16}
)


def bias_free_relu_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).double()


def test_integrated_gradients_from_zero_is_x_times_g_for_a_bias_free_relu_network() -> None:
    """Such a network is positively homogeneous: along the path t x its gradient is g(x), so IG
    from 0 is x ⊙ g exactly, and completeness holds to round-off."""
    x = torch.randn(6, 1, 3, 4, dtype=torch.float64)
    model = bias_free_relu_net()
    ds = compute_saliency(model, x, device="cpu", attributions=ALL_METHODS)
    ig = ds["attribution_map"].sel(attribution="integrated_gradients").values
    # float64 rounding: g_k = sum_m W1_mk mask_m W2_cm (16 terms, operands |W2_c| |W1|), recomputed in other batches at
    # each of the quadrature points and averaged with weights summing to 1 (steps terms), times x_k
    steps = ALL_METHODS.integrated_gradients["steps"]
    w1, w2 = model[1].weight.detach().abs().numpy(), model[3].weight.detach().abs().numpy()
    gradient_operands = (w2 @ w1)[ds["prediction"].values].reshape(x.shape)
    ig_operands = np.abs(x.numpy()) * gradient_operands
    assert_within(ig, x.numpy() * ds["saliency"].values, float_tolerance(torch.float64, ig_operands, terms=16 + steps + 1))
    # sum_k IG_k - Psi(x) with Psi(0) = 0: both sums of the same operands, over the 12 inputs as well
    completeness = float_tolerance(torch.float64, ig_operands.reshape(len(x), -1).sum(1), terms=12 + 16 + steps + 1)
    assert_within(ds["ig_completeness_error"].values, 0.0, completeness)


def test_integrated_gradients_completeness_error_is_stored_against_the_logits() -> None:
    """With biases and a smooth nonlinearity, Σ IG − (Ψ^{i*}(x) − Ψ^{i*}(0)) is what the store
    says, computed here from the model directly; and it is small for enough steps."""
    model = smooth_model()
    x = torch.randn(5, 1, 3, 4, dtype=torch.float64)
    ds = compute_saliency(model, x, device="cpu", attributions=ALL_METHODS)
    with torch.no_grad():
        pred = torch.as_tensor(ds["prediction"].values)
        rows = torch.arange(len(x))
        gap = (model(x)[rows, pred] - model(torch.zeros_like(x))[rows, pred]).numpy()
    ig = ds["attribution_map"].sel(attribution="integrated_gradients").values.reshape(len(x), -1)
    total = ig.sum(axis=1)
    # the same difference, rounded in float64 in other batches and orders: operands the 12 IG terms and the two logits
    (at_x, _, terms), (at_zero, _, _) = (tanh_mlp_operands(model, z) for z in (x, torch.zeros_like(x)))
    rows = np.arange(len(x)), pred.numpy()
    tolerance = float_tolerance(torch.float64, np.abs(ig).sum(axis=1), at_x[rows], at_zero[rows], terms=12 + terms)
    assert_within(ds["ig_completeness_error"].values, total - gap, tolerance)
    # not a rounding tolerance: 16 Gauss-Legendre steps on this smooth model leave an approximation error this small
    assert np.abs(ds["ig_completeness_error"].values).max() < 1e-3 * np.abs(gap).max()


def test_black_baseline_starts_at_pixel_zero() -> None:
    """With a pixel offset, the black image is −offset in the input space: for a linear model
    IG is (x − baseline) ⊙ w, and the two baselines differ by exactly offset ⊙ w."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(4, 1, 3, 4, dtype=torch.float64)
    space = InputSpace(pixel_offset=(0.25,))
    maps = {}
    for baseline in ("zero", "black"):
        options = AttributionOptions(methods=["integrated_gradients"], smoothgrad={}, integrated_gradients={"baseline": baseline, "steps": 4})
        ds = compute_saliency(model, x, device="cpu", attributions=options, space=space)
        maps[baseline] = ds["attribution_map"].sel(attribution="integrated_gradients").values
    # float64: (x - baseline) w times 4 quadrature weights summing to 1, for each baseline; operands (|x| + |x + 0.25|) |w|
    operands = (2 * np.abs(x.numpy()) + 0.25) * np.abs(ds["saliency"].values)
    assert_within(maps["black"] - maps["zero"], 0.25 * ds["saliency"].values, float_tolerance(torch.float64, operands, terms=4 + 3))


def test_smoothgrad_is_signed_and_of_the_predicted_logit() -> None:
    """A linear model's gradient is the same at every noisy copy, so SmoothGrad is the predicted
    class's weight row, signs included: with abs=True (Captum's Saliency default) the negative
    weights would come back positive and this fails."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(8, 1, 3, 4, dtype=torch.float64)
    ds = compute_saliency(model, x, device="cpu", attributions=ALL_METHODS)
    weights = model[1].weight.detach().numpy()[ds["prediction"].values]
    assert (weights < 0).any()
    smoothgrad = ds["attribution_map"].sel(attribution="smoothgrad").values.reshape(len(x), -1)
    # the mean of n gradients that are each exactly the weight row: a float64 sum of n terms and a division
    n = ALL_METHODS.smoothgrad["n"]
    assert_within(smoothgrad, weights, float_tolerance(torch.float64, np.abs(weights), terms=n + 1))


def test_smoothgrad_averages_the_gradient_over_noise_and_is_reproducible() -> None:
    """For a nonlinear model SmoothGrad differs from the gradient, is the same on a rerun (its
    noise is seeded), and leaves the global random state alone."""
    model = smooth_model()
    x = torch.randn(5, 1, 3, 4, dtype=torch.float64)
    state = torch.random.get_rng_state()
    first = compute_saliency(model, x, device="cpu", attributions=ALL_METHODS)
    assert torch.equal(state, torch.random.get_rng_state())
    second = compute_saliency(model, x, device="cpu", attributions=ALL_METHODS)
    smoothgrad = first["attribution_map"].sel(attribution="smoothgrad").values
    np.testing.assert_array_equal(smoothgrad, second["attribution_map"].sel(attribution="smoothgrad").values)
    # they differ by far more than the float64 rounding of the gradient could make them
    _, gradient_operands, terms = tanh_mlp_operands(model, x)
    rounding = float_tolerance(torch.float64, gradient_operands[np.arange(len(x)), first["prediction"].values], terms=terms)
    assert (np.abs(smoothgrad - first["saliency"].values) > 1000 * rounding.reshape(x.shape)).any()
