"""Saliency maps: the gradient of the predicted-class logit, and the saliency store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from saliency_robustness.data import InputSpace
from saliency_robustness.models import load_model
from saliency_robustness.stages.saliency import AttributionOptions, compute_saliency, saliency_stage


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
    np.testing.assert_allclose(ds["logits"].values, logits.numpy(), rtol=1e-12)
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
    xr.testing.assert_allclose(compute_saliency(model, x, batch_size=3), compute_saliency(model, x, batch_size=64))


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
    expected = compute_saliency(load_model(tiny_experiment["model_dir"]), eval_ds["images"].values, device="cpu")
    np.testing.assert_allclose(ds["saliency"].values, expected["saliency"].values, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(ds["prediction"].values, expected["prediction"].values)


def test_saliency_rejects_images_without_four_dims() -> None:
    with pytest.raises(ValueError, match="sample, channel, y, x"):
        compute_saliency(smooth_model(), torch.zeros(3, 12, dtype=torch.float64))


# --- attribution methods through Captum (docs/spec.md §2) ---

ALL_METHODS = AttributionOptions(methods=["smoothgrad", "integrated_gradients"], integrated_gradients={"baseline": "zero", "steps": 16})


def bias_free_relu_net() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False)).double()


def test_integrated_gradients_from_zero_is_x_times_g_for_a_bias_free_relu_network() -> None:
    """Such a network is positively homogeneous: along the path t x its gradient is g(x), so IG
    from 0 is x ⊙ g exactly, and completeness holds to round-off."""
    x = torch.randn(6, 1, 3, 4, dtype=torch.float64)
    ds = compute_saliency(bias_free_relu_net(), x, device="cpu", attributions=ALL_METHODS)
    ig = ds["attribution_map"].sel(attribution="integrated_gradients").values
    np.testing.assert_allclose(ig, x.numpy() * ds["saliency"].values, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ds["ig_completeness_error"].values, 0.0, atol=1e-9)


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
    total = ds["attribution_map"].sel(attribution="integrated_gradients").values.reshape(len(x), -1).sum(axis=1)
    np.testing.assert_allclose(ds["ig_completeness_error"].values, total - gap, atol=1e-10)
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
        options = AttributionOptions(methods=["integrated_gradients"], integrated_gradients={"baseline": baseline, "steps": 4})
        ds = compute_saliency(model, x, device="cpu", attributions=options, space=space)
        maps[baseline] = ds["attribution_map"].sel(attribution="integrated_gradients").values
    np.testing.assert_allclose(maps["black"] - maps["zero"], 0.25 * ds["saliency"].values, atol=1e-12)


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
    np.testing.assert_allclose(smoothgrad, weights, atol=1e-12)


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
    assert not np.allclose(smoothgrad, first["saliency"].values)
