"""Explanation-quality measures (issue 23): Gini, ROAD and its noisy linear imputation, max-sensitivity and
infidelity, against known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROUNDING_LAMBDA, assert_within, float_tolerance, logit_operands, reduction_terms
from saliency_robustness.architectures import MnistCNN
from saliency_robustness.attributions import logit_gradient
from saliency_robustness.explanation_quality import (
    NEIGHBOUR_WEIGHTS,
    gaussian_perturbations,
    gini,
    imputation_system,
    infidelity,
    infidelity_of_perturbations,
    max_sensitivity,
    noisy_linear_imputation,
    removal_counts,
    removal_masks,
    road,
)


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """Logits ``W x + b`` of the flattened image, in eval mode and ``weight``'s dtype."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer).eval()


class HalfSquaredNorm(nn.Module):
    """Logits ``(||x||^2 / 2, 0)``: the first logit's gradient is ``x`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = 0.5 * x.flatten(1).pow(2).sum(dim=1)
        return torch.stack([first, torch.zeros_like(first)], dim=1)


# --- Gini --------------------------------------------------------------------------------------


def test_gini_of_a_one_hot_map_is_n_minus_one_over_n() -> None:
    a = torch.zeros(3, 2, 4, 5, dtype=torch.float64)
    a[0, 0, 0, 0], a[1, 1, 2, 3], a[2, 0, 3, 4] = 1.0, -7.5, 1e-3
    n = a[0].numel()
    # G = 1 - 2 (c (1/2) / n) / c: four roundings of numbers at most 1
    assert_within(gini(a), (n - 1) / n, float_tolerance(np.float64, 1.0, terms=4))


def test_gini_of_a_constant_map_is_zero_and_of_half_ones_is_one_half() -> None:
    constant = torch.full((2, 3, 4, 4), 0.3, dtype=torch.float64)
    constant[1] = -2.0
    n = constant[0].numel()
    # sum_k c (n - k + 1/2) / n over n terms, divided by sum_k c (n terms): relative rounding of both sums, G = 1 - 2 R
    assert_within(gini(constant), 0.0, 2 * float_tolerance(np.float64, 1.0, terms=n + 2))
    # sorted (0, 0, 1, 1): R = (1.5 + 0.5) / 4 / 2 = 1/4, G = 1/2
    assert_within(gini(torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)), 0.5, float_tolerance(np.float64, 1.0, terms=6))


def test_gini_is_invariant_to_the_maps_scale_and_sign() -> None:
    a = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = gini(a).numpy()
    n = a[0].numel()
    ratio = (1 - reference) / 2  # R = sum_k c_(k) w_k / sum_k c_(k), both n-term sums (plus the scaling's rounding)
    # a relative error of R from each sum (twice float_tolerance's one-computation bound each), G = 1 - 2 R
    tolerance = 4 * float_tolerance(np.float64, ratio, terms=n + 1)
    for scale in (3.7, -0.01, 1e6):
        assert_within(gini(scale * a), reference, tolerance, err_msg=f"scale {scale}")


def test_gini_of_an_all_zero_map_is_nan() -> None:
    a = torch.zeros(3, 1, 4, 4)
    a[1, 0, 2, 2] = 1.0
    values = gini(a)
    assert values.dtype == torch.float64
    assert math.isnan(values[0]) and math.isnan(values[2])
    assert_within(values[1], 15 / 16, float_tolerance(np.float64, 1.0, terms=16 + 2))  # (n - 1) / n, n = 16


# --- ROAD: ranking, imputation, curves -------------------------------------------------------


def test_removal_ranks_pixels_by_the_absolute_attribution_summed_over_channels() -> None:
    a = torch.zeros(1, 2, 2, 3)
    a[0, 0] = torch.tensor([[3.0, -1.0, 0.5], [0.0, 2.0, -2.0]])
    a[0, 1] = torch.tensor([[-1.0, 2.5, 0.5], [2.0, 1.0, 1.0]])
    # sum_c |a_c| = [[4, 3.5, 1], [2, 3, 3]]: MoRF 4, 3.5, then 3 (row-major first of the tie), 3, 2, 1
    morf = removal_masks(a, [0.0, 1 / 3, 0.5, 0.8], "morf")[0]
    expected_morf = [
        [[0, 0, 0], [0, 0, 0]],
        [[1, 1, 0], [0, 0, 0]],
        [[1, 1, 0], [0, 1, 0]],
        [[1, 1, 0], [1, 1, 1]],
    ]
    assert morf.tolist() == [[[bool(v) for v in row] for row in m] for m in expected_morf]
    lerf = removal_masks(a, [1 / 3, 0.5], "lerf")[0]
    assert lerf.tolist() == [[[False, False, True], [True, False, False]], [[False, False, True], [True, True, False]]]
    assert removal_counts([0.1, 0.5, 0.9], 784) == [78, 392, 706]  # floor(f n + 1/2)
    for bad in ([0.5, 0.5], [0.6, 0.4], [1.0], [-0.1], []):
        with pytest.raises(ValueError):
            removal_counts(bad, 784)


def neighbour_means(image: np.ndarray) -> np.ndarray:
    """Per channel and pixel, the weighted mean of its neighbours inside the image (weights renormalised at the
    border), and the weighted sum of their absolute values: a plain loop, independent of the module's system."""
    channels, h, w = image.shape
    means, magnitudes = np.zeros_like(image), np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            total, weights, magnitude = np.zeros(channels), 0.0, np.zeros(channels)
            for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    total += weight * image[:, y + dy, x + dx]
                    magnitude += weight * np.abs(image[:, y + dy, x + dx])
                    weights += weight
            means[:, y, x], magnitudes[:, y, x] = total / weights, magnitude / weights
    return means, magnitudes


def random_removal(shape: tuple[int, ...], share: float, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < share


def test_imputation_changes_only_the_removed_pixels() -> None:
    x = torch.rand(3, 3, 7, 6, generator=torch.Generator().manual_seed(1))
    removed = random_removal((3, 7, 6), 0.4, seed=2)
    imputed = noisy_linear_imputation(x, removed, noise_std=0.05, seed=0)
    assert imputed.dtype == x.dtype and imputed.shape == x.shape
    keep = ~removed[:, None].expand_as(x)
    assert torch.equal(imputed[keep], x[keep])  # bit-identical
    assert (imputed[~keep] != x[~keep]).all()
    assert torch.equal(noisy_linear_imputation(x, removed, noise_std=0.05, seed=0), imputed)  # seeded
    assert not torch.equal(noisy_linear_imputation(x, removed, noise_std=0.05, seed=1), imputed)


def test_imputed_pixels_are_the_weighted_mean_of_their_neighbours() -> None:
    """Without noise, every removed pixel (the border's included) equals the weighted mean of its neighbours in the
    imputed image: the equations the system solves, checked by a plain loop."""
    x = torch.rand(2, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    removed = random_removal((2, 7, 6), 0.6, seed=4)
    imputed = noisy_linear_imputation(x, removed, noise_std=0.0, seed=0).numpy()
    m = int(removed.sum())
    for k in range(len(x)):
        means, magnitudes = neighbour_means(imputed[k])
        mask = removed[k].numpy()
        # the residual of a backward-stable LU solve of m unknowns: rounding of the equation's terms (the weighted
        # neighbours and the pixel itself), over an m-term elimination and the 9-term right-hand side
        tolerance = float_tolerance(np.float64, magnitudes + np.abs(imputed[k]), terms=m + 9)
        assert_within(imputed[k][:, mask], means[:, mask], tolerance[:, mask], err_msg=f"image {k}")


def test_imputation_reproduces_a_linear_ramp_in_the_interior() -> None:
    """The weighted mean over the symmetric 8-neighbourhood of an affine function is exact, so the ramp solves the
    system when every removed pixel lies inside (its 8 neighbours in the image): the unique solution is the ramp."""
    h, w = 9, 10
    y, x = np.mgrid[0:h, 0:w]
    ramp = np.stack([1.0 + 3.0 * y + 2.0 * x, -4.0 - 1.0 * y + 5.0 * x])  # integers: exact in float64
    images = torch.tensor(np.stack([ramp, 2 * ramp]), dtype=torch.float64)
    removed = random_removal((2, h, w), 0.7, seed=5)
    removed[:, 0], removed[:, -1], removed[:, :, 0], removed[:, :, -1] = False, False, False, False
    removed[0, 2:7, 2:8] = True  # a large connected hole
    imputed = noisy_linear_imputation(images, removed, noise_std=0.0, seed=0)
    system, _ = imputation_system(removed.numpy())
    m = system.shape[0]
    condition = np.linalg.cond(system.toarray())
    # forward error of a backward-stable solve: the condition number times the relative backward error (an m-term
    # elimination, a 9-term right-hand side), relative to the largest value
    tolerance = condition * float_tolerance(np.float64, images.abs().max().item(), terms=m + 9)
    assert_within(imputed, images, tolerance)


def test_imputation_noise_is_gaussian_of_the_stated_std_on_the_imputed_pixels() -> None:
    x = torch.rand(4, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    removed = random_removal((4, 24, 24), 0.5, seed=7)
    std = 0.2
    noise = (noisy_linear_imputation(x, removed, noise_std=std, seed=3) - noisy_linear_imputation(x, removed, noise_std=0.0, seed=3)).permute(
        0, 2, 3, 1
    )
    assert (noise[~removed] == 0).all()
    draws = noise[removed].flatten().numpy()
    n = draws.size
    # lambda standard errors of the sample mean (std / sqrt(n)) and of the sample std (std / sqrt(2 n))
    assert abs(draws.mean()) <= ROUNDING_LAMBDA * std / math.sqrt(n)
    assert abs(draws.std() - std) <= ROUNDING_LAMBDA * std / math.sqrt(2 * n)


def test_imputation_refuses_an_image_with_every_pixel_removed() -> None:
    with pytest.raises(ValueError, match="every pixel"):
        noisy_linear_imputation(torch.rand(2, 1, 3, 3), torch.tensor([[[False] * 3] * 3, [[True] * 3] * 3]), noise_std=0.0, seed=0)


def test_road_on_a_linear_model_removes_the_score_fastest_most_relevant_first() -> None:
    """Logits ``(<w, x> - c, 0)`` with ``w >= 0`` on images in [0, 1]: class 0 is predicted for every image, and the map
    is the predicted class's weight row times x (``w * x``, gradient times input: each pixel's share of the logit).
    Removing the largest shares first (their imputed neighbour means are smaller) lowers the probability faster
    than removing pixels in a random order, and far faster than removing the smallest shares first."""
    generator = torch.Generator().manual_seed(8)
    x = torch.rand(16, 1, 8, 8, generator=generator)
    w = torch.rand(64, generator=generator)
    logit = x.flatten(1) @ w
    model = linear_model(torch.stack([w, torch.zeros(64)]), torch.tensor([1.0 - logit.min().item(), 0.0]))
    prediction = model(x).argmax(dim=1)
    assert (prediction == 0).all()
    fractions = [round(0.1 * k, 1) for k in range(1, 10)]
    share = w.reshape(1, 1, 8, 8) * x
    curves = road(model, x, prediction, share, fractions=fractions, noise_std=0.01, seed=0)
    random_order = road(model, x, prediction, torch.rand(x.shape, generator=generator), fractions=fractions, noise_std=0.01, seed=0)
    grid = torch.tensor(fractions)
    morf, lerf, random_morf = (torch.trapezoid(c, grid, dim=1) for c in (curves.morf, curves.lerf, random_order.morf))
    assert (morf < random_morf).all(), (morf, random_morf)
    assert (morf < lerf).all(), (morf, lerf)
    assert (curves.area_between > 0).all()
    assert_within(curves.area_between, (lerf - morf).double(), float_tolerance(np.float32, lerf.double() + morf.double(), terms=len(fractions)))


def test_road_reads_the_predicted_probability_and_is_seeded() -> None:
    torch.manual_seed(0)
    model = MnistCNN(in_channels=1, num_classes=10, image_size=8).eval()
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        probability = torch.softmax(model(x), dim=1)
    prediction = probability.argmax(dim=1)
    a = logit_gradient(model, x, prediction)
    state = torch.get_rng_state()
    curves = road(model, x, prediction, a, fractions=[0.0, 0.25, 0.5], noise_std=0.01, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    assert curves.morf.shape == curves.lerf.shape == (3, 3) and curves.area_between.shape == (3,)
    # fraction 0 removes nothing: the probability at x itself, from another batch. Logits that err by delta move a
    # softmax probability p by at most 2 p max |delta|, plus the softmax's own rounding (a sum of the classes)
    expected = probability.gather(1, prediction[:, None])[:, 0].double().numpy()
    delta = float_tolerance(np.float32, logit_operands(model, x), terms=reduction_terms(model)).max(axis=1)
    tolerance = 2 * expected * delta + float_tolerance(np.float32, 1.0, terms=probability.shape[1] + 2)
    assert_within(curves.morf[:, 0], expected, tolerance)
    assert_within(curves.lerf[:, 0], expected, tolerance)
    again = road(model, x, prediction, a, fractions=[0.0, 0.25, 0.5], noise_std=0.01, seed=4)
    assert torch.equal(again.morf, curves.morf) and torch.equal(again.lerf, curves.lerf)
    with pytest.raises(ValueError, match="eval mode"):
        road(model.train(), x, prediction, a, fractions=[0.5], noise_std=0.01, seed=0)


# --- max-sensitivity ---------------------------------------------------------------------------


def test_max_sensitivity_of_a_linear_models_gradient_is_zero() -> None:
    generator = torch.Generator().manual_seed(10)
    weight, bias = torch.randn(4, 2 * 5 * 5, generator=generator), torch.randn(4, generator=generator)
    model = linear_model(weight, bias)
    x = torch.rand(6, 2, 5, 5, generator=generator)
    prediction = model(x).argmax(dim=1)
    values = max_sensitivity(model, x, prediction, explanation=logit_gradient, radius=0.1, n_samples=7, seed=0)
    assert values.shape == (6,)
    # the gradient W^T e_i is a 4-term sum, whatever x: relative rounding of its entries
    assert_within(values, 0.0, float_tolerance(np.float32, 1.0, terms=4))


def test_max_sensitivity_of_the_identity_gradient_is_the_largest_relative_perturbation() -> None:
    """``Psi^0 = ||x||^2 / 2`` has gradient ``x``, so the measure is ``max_k ||d_k|| / ||x||`` over Captum's draws: one
    ``uniform_(-r, r)`` of all N K copies from the CPU generator seeded with ``seed``, image n's copies first."""
    model = HalfSquaredNorm().eval()
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(11)) + 0.5
    prediction = torch.zeros(3, dtype=torch.long)
    radius, n_samples, seed = 0.05, 5, 12
    state = torch.get_rng_state()
    values = max_sensitivity(model, x, prediction, explanation=logit_gradient, radius=radius, n_samples=n_samples, seed=seed)
    assert torch.equal(torch.get_rng_state(), state)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.empty(3 * n_samples, 1, 6, 6).uniform_(-radius, radius, generator=generator).double().reshape(3, n_samples, -1)
    norms = x.double().flatten(1).norm(dim=1)
    expected = draws.norm(dim=2).amax(dim=1) / norms
    assert (expected <= radius * math.sqrt(36) / norms).all()  # inside the L-inf ball
    # (x + d) - x rounds each entry relative to |x| + |d|; the norms are 36-term sums
    tolerance = float_tolerance(np.float32, (norms + radius * 6) / norms, terms=36 + 2)
    assert_within(values, expected, tolerance)
    assert torch.equal(max_sensitivity(model, x, prediction, explanation=logit_gradient, radius=radius, n_samples=n_samples, seed=seed), values)


# --- infidelity --------------------------------------------------------------------------------


def linear_infidelity_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 3-class float32 linear model, 4 images, their predictions, a random map and 5 Gaussian perturbations each."""
    generator = torch.Generator().manual_seed(13)
    weight, bias = torch.randn(3, 18, generator=generator), torch.randn(3, generator=generator)
    model = linear_model(weight, bias)
    x = torch.rand(4, 2, 3, 3, generator=generator)
    prediction = model(x).argmax(dim=1)
    a = torch.randn(x.shape, generator=generator)
    perturbations = gaussian_perturbations(x, n_perturbations=5, std=0.1, seed=14)
    return model, x, prediction, a, perturbations, weight


def hand_infidelity(
    model: nn.Module, x: torch.Tensor, prediction: torch.Tensor, a: torch.Tensor, perturbations: torch.Tensor, weight: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image and perturbation, in float64: ``s_k = <I_k, a>``, ``Delta_k = f(x) - f(x - I_k) = <w_i*, I_k>``
    (the model is affine), and the float32 rounding tolerances of both as the model computes them: ``<I, a>`` is a
    D-term sum; ``Delta`` the difference of two (D + 1)-term logits, one of the rounded ``x - I``."""
    w = weight.double()[prediction].numpy()[:, None, :]  # (N, 1, D)
    bias = model[1].bias.detach().double()[prediction].abs().numpy()[:, None]
    i = perturbations.double().flatten(2).numpy()  # (N, K, D)
    xs = x.double().flatten(1).numpy()[:, None, :]
    s = (i * a.double().flatten(1).numpy()[:, None, :]).sum(axis=2)
    delta = (i * w).sum(axis=2)
    d = x.shape[1] * x.shape[2] * x.shape[3]
    s_tolerance = float_tolerance(np.float32, np.abs(i * a.double().flatten(1).numpy()[:, None, :]).sum(axis=2), terms=d)
    delta_operands = np.abs(w * xs).sum(axis=2) + 2 * bias + 2 * np.abs(w * (xs - i)).sum(axis=2)
    delta_tolerance = float_tolerance(np.float32, delta_operands, terms=d + 1)
    return s, delta, s_tolerance, delta_tolerance


def test_infidelity_equals_the_hand_computed_mean_squared_error() -> None:
    model, x, prediction, a, perturbations, weight = linear_infidelity_case()
    s, delta, s_tol, delta_tol = hand_infidelity(model, x, prediction, a, perturbations, weight)
    k = perturbations.shape[1]
    error = s - delta
    expected = (error**2).mean(axis=1)
    step = s_tol + delta_tol  # each error's tolerance; the square's first and second order, then the mean
    tolerance = (2 * np.abs(error) * step + step**2).mean(axis=1) + float_tolerance(np.float32, expected, terms=k + 1)
    values = infidelity_of_perturbations(model, x, prediction, a, perturbations, normalize=False)
    assert values.shape == (4,)
    assert_within(values, expected, tolerance)
    # the seeded Gaussian route draws the same perturbations
    assert torch.equal(infidelity(model, x, prediction, a, n_perturbations=5, std=0.1, seed=14, normalize=False), values)


def test_normalized_infidelity_equals_the_hand_computed_value_with_the_optimal_scale() -> None:
    model, x, prediction, a, perturbations, weight = linear_infidelity_case()
    s, delta, s_tol, delta_tol = hand_infidelity(model, x, prediction, a, perturbations, weight)
    k = perturbations.shape[1]
    beta = (s * delta).sum(axis=1) / (s**2).sum(axis=1)
    residual = beta[:, None] * s - delta
    expected = (residual**2).mean(axis=1)
    # first order: d/dDelta_k = (2/K)(Delta_k - beta s_k), d/ds_k = (2 beta/K)(beta s_k - Delta_k); plus Captum's
    # float32 evaluation of beta^2 sum s^2 - 2 beta sum s Delta + sum Delta^2 (it cancels), over K
    first = (2 / k) * (np.abs(residual) * (delta_tol + np.abs(beta[:, None]) * s_tol)).sum(axis=1)
    aggregate = (beta**2 * (s**2).sum(axis=1) + 2 * np.abs(beta * (s * delta).sum(axis=1)) + (delta**2).sum(axis=1)) / k
    tolerance = first + float_tolerance(np.float32, aggregate, terms=k + 4)
    values = infidelity_of_perturbations(model, x, prediction, a, perturbations, normalize=True)
    assert_within(values, expected, tolerance)
    # invariant to the map's scale (beta absorbs it), unlike the unnormalised value
    assert_within(infidelity_of_perturbations(model, x, prediction, 8.0 * a, perturbations, normalize=True), expected, tolerance)


def test_infidelity_of_a_linear_models_gradient_is_zero() -> None:
    model, x, prediction, _, perturbations, weight = linear_infidelity_case()
    gradient = logit_gradient(model, x, prediction)
    s, delta, s_tol, delta_tol = hand_infidelity(model, x, prediction, gradient, perturbations, weight)
    k = perturbations.shape[1]
    # <I, w> - <w, I> = 0 up to each term's rounding; the mean of the squares is at most the mean squared rounding
    rounding = ((s_tol + delta_tol) ** 2).mean(axis=1)
    values = infidelity_of_perturbations(model, x, prediction, gradient, perturbations, normalize=False)
    assert_within(values, 0.0, rounding)
    # normalised: the minimum over beta is at most its value at beta = 1, but Captum evaluates
    # beta^2 sum s^2 - 2 beta sum s Delta + sum Delta^2 in float32, which cancels to 0 (beta ~ 1, s ~ Delta)
    aggregate = ((s**2).sum(axis=1) + 2 * np.abs((s * delta).sum(axis=1)) + (delta**2).sum(axis=1)) / k
    values = infidelity_of_perturbations(model, x, prediction, gradient, perturbations, normalize=True)
    assert_within(values, 0.0, rounding + float_tolerance(np.float32, aggregate, terms=k + 4))


def test_gaussian_perturbations_are_seeded_and_of_the_stated_std() -> None:
    x = torch.zeros(3, 2, 8, 8)
    draws = gaussian_perturbations(x, n_perturbations=50, std=0.3, seed=5)
    assert draws.shape == (3, 50, 2, 8, 8) and draws.dtype == x.dtype
    assert torch.equal(gaussian_perturbations(x, n_perturbations=50, std=0.3, seed=5), draws)
    n = draws.numel()
    assert abs(draws.double().std().item() - 0.3) <= ROUNDING_LAMBDA * 0.3 / math.sqrt(2 * n)


# --- the MNIST network ---------------------------------------------------------------------------


def test_every_measure_runs_on_the_mnist_network() -> None:
    torch.manual_seed(0)
    model = MnistCNN(in_channels=1, num_classes=10, image_size=8).eval()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(15))
    with torch.no_grad():
        prediction = model(x).argmax(dim=1)
    a = logit_gradient(model, x, prediction)
    g = gini(a)
    assert ((g >= 0) & (g < 1)).all()
    curves = road(model, x, prediction, a, fractions=[0.1, 0.5, 0.9], noise_std=0.01, seed=0)
    assert ((curves.morf >= 0) & (curves.morf <= 1) & (curves.lerf >= 0) & (curves.lerf <= 1)).all()
    sensitivity = max_sensitivity(model, x, prediction, explanation=logit_gradient, radius=0.1, n_samples=3, seed=0)
    assert sensitivity.shape == (4,) and (sensitivity >= 0).all() and torch.isfinite(sensitivity).all()
    values = infidelity(model, x, prediction, a, n_perturbations=3, std=0.1, seed=0, normalize=False)
    assert values.shape == (4,) and (values >= 0).all() and torch.isfinite(values).all()
