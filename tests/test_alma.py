"""ALMA-L2 (saliency_robustness.alma): its penalty and constraint against closed forms, its
first step, and its distances against models whose boundary is known: exact on an affine
binary model, never below the true distance, every result verified."""

from __future__ import annotations

import foolbox as fb
import numpy as np
import pytest
import torch
from torch import nn

from conftest import WIDE, affine_images, affine_model, distance_tolerance, exact_robustness
from saliency_robustness.alma import ALMAL2Attack, difference_of_logits_ratio, first_step_size, penalty_p2, penalty_p2_derivative
from saliency_robustness.data import InputSpace
from saliency_robustness.ensemble import check_ensemble, run_attack
from saliency_robustness.errors import ConfigError

UNIT = InputSpace(pixel_offset=(0.0,), pixel_bounds=(0.0, 1.0))


def test_penalty_p2_is_the_closed_form_and_its_derivative_matches_finite_differences() -> None:
    y = torch.tensor([-3.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 2.0], dtype=torch.float64)
    rho, mu = torch.tensor(1.7, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    by_hand = [mu * v / (1 - rho * v) if v < 0 else mu * v + mu * rho * v**2 + rho**2 * v**3 / 6 for v in y]
    torch.testing.assert_close(penalty_p2(y, rho, mu), torch.stack(by_hand))
    h = 1e-6
    finite = (penalty_p2(y + h, rho, mu) - penalty_p2(y - h, rho, mu)) / (2 * h)
    torch.testing.assert_close(penalty_p2_derivative(y, rho, mu), finite, rtol=1e-6, atol=1e-8)
    # at the constraint's boundary: value 0, slope mu from both sides (a smooth multiplier update)
    assert penalty_p2(torch.zeros(1), rho, mu).item() == 0.0
    assert penalty_p2_derivative(torch.zeros(1), rho, mu).item() == pytest.approx(mu.item())


def test_the_constraint_is_the_difference_of_logits_ratio() -> None:
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0], [1.0, 5.0, 2.0, 2.5]])
    classes = torch.tensor([0, 0])
    g = difference_of_logits_ratio(logits, classes, targeted=False, kappa=0.0)
    # (z_y - max other) / (z_(1) - z_(3)): (4 - 3) / (4 - 1); (1 - 5) / (5 - 2)
    torch.testing.assert_close(g, torch.tensor([1 / 3, -4 / 3]))
    target = difference_of_logits_ratio(logits, torch.tensor([2, 1]), targeted=True, kappa=0.0)
    # (max other - z_t) / (z_(1) - (z_(3) + z_(4)) / 2): (4 - 3) / (4 - 0.5); (2.5 - 5) / (5 - 1.5)
    torch.testing.assert_close(target, torch.tensor([1 / 3.5, -2.5 / 3.5]))
    # kappa: a tie is not yet adversarial
    tie = difference_of_logits_ratio(torch.tensor([[2.0, 2.0, 0.0]]), torch.tensor([0]), targeted=False, kappa=1e-4)
    assert tie.item() > 0
    # two classes: the margin itself
    margin = difference_of_logits_ratio(torch.tensor([[3.0, 1.0]]), torch.tensor([0]), targeted=False, kappa=0.0)
    torch.testing.assert_close(margin, torch.tensor([2.0]))


def test_the_first_step_has_the_asked_length_after_the_box() -> None:
    x = torch.tensor([[0.5, 0.5, 0.5], [0.99, 0.5, 0.5]])
    direction = torch.tensor([[1.0, 0.0, 0.0], [-1.0, -1.0, 0.0]])  # second row: the box clips dimension 0
    eta = first_step_size(x, direction, (0.0, 1.0), distance=0.3)
    moved = ((x - eta[:, None] * direction).clamp(0, 1) - x).norm(dim=1)
    torch.testing.assert_close(moved, torch.full((2,), 0.3), rtol=1e-5, atol=0)
    assert eta[0].item() == pytest.approx(0.3, rel=1e-5)


def binary_affine_model(seed: int = 0) -> nn.Module:
    return affine_model(seed=seed, classes=2)


def verified_upper_bounds(model: nn.Module, x: torch.Tensor, kwargs: dict) -> tuple[np.ndarray, np.ndarray]:
    """ALMA's norms on every image of an affine model, each flipped and none below the exact
    distance (within the float32 tolerance), beside that distance."""
    rho = exact_robustness(model, x)
    ds = run_attack(model, x, WIDE, attack="ALMAL2Attack", kwargs=kwargs, store_adversarials=False)
    norms = ds["perturbation_norm"].values
    assert ds["success"].values.all()
    assert (norms >= rho - distance_tolerance(model, x, norms)).all()
    return norms, rho


def test_alma_finds_the_exact_distance_of_an_affine_binary_model() -> None:
    """One hyperplane: ALMA's best iterate, trimmed by bisection, is at the exact distance
    within 1e-4 relative or 1e-5 absolute at 1000 steps: the last step is init_epsilon x
    lr_reduction = 1e-3 long, and the iterates straddle the boundary within 1 % of it
    (RMSProp's per-pixel scaling turns the direction slightly off the normal)."""
    model, x = binary_affine_model(), affine_images(n=20)
    norms, rho = verified_upper_bounds(model, x, {"steps": 1000, "boundary_search_steps": 20})
    np.testing.assert_allclose(norms, rho, rtol=1e-4, atol=1e-5)


def test_alma_is_never_below_the_exact_distance_of_a_ten_class_affine_model() -> None:
    """Ten hyperplanes: the nearest may not be the one ALMA heads for (an untargeted attack
    follows the runner-up), so it is an upper bound, and tight for most images."""
    model, x = affine_model(), affine_images(n=30)
    norms, rho = verified_upper_bounds(model, x, {"steps": 200, "boundary_search_steps": 20})
    assert np.mean(norms <= 1.01 * rho) >= 0.8


def test_alma_over_every_runner_up_target_finds_the_nearest_hyperplane() -> None:
    """``targets: 9``: one targeted run per other class; the nearest of the ten regions is
    among them, so every image comes within 1 % (plus 1e-3 in L2, for images a hundredth of a
    unit from the boundary, where the first step's length dominates) of the exact distance."""
    model, x = affine_model(), affine_images(n=30)
    norms, rho = verified_upper_bounds(model, x, {"steps": 200, "boundary_search_steps": 20, "targets": 9})
    assert (norms <= 1.01 * rho + 1e-3).all()


class Ball(nn.Module):
    """Class 0 inside the ball of radius ``radius`` around ``centre``, class 1 outside: a curved
    boundary at distance ``|radius - ||x - centre|| |`` from every point."""

    def __init__(self, centre: torch.Tensor, radius: float) -> None:
        super().__init__()
        self.register_buffer("centre", centre)
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outside = (x - self.centre).flatten(1).norm(dim=1) - self.radius
        return torch.stack([-outside, outside, torch.full_like(outside, -10.0)], dim=1)


def test_alma_on_a_curved_boundary_is_never_below_the_true_distance_and_close_to_it() -> None:
    centre = torch.full((1, 4, 4), 0.5)
    model = Ball(centre, radius=0.6).eval()
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    distance = (0.6 - (x - centre).flatten(1).norm(dim=1)).abs().numpy()
    ds = run_attack(model, x, UNIT, attack="ALMAL2Attack", kwargs={"steps": 200, "boundary_search_steps": 20}, store_adversarials=False)
    norms = ds["perturbation_norm"].values
    found = ds["success"].values
    assert found.sum() >= 14
    assert (norms[found] >= distance[found] * (1 - 1e-5)).all()
    np.testing.assert_allclose(norms[found], distance[found], rtol=1e-2)


def test_alma_targeted_reaches_the_target_and_respects_the_pairwise_bound() -> None:
    """A target ``t`` is reached no closer than the hyperplane ``z_t = z_y``."""
    model, x = affine_model(), affine_images(n=12)
    with torch.no_grad():
        logits = model(x)
    clean = logits.argmax(1)
    target = logits.argsort(dim=1)[:, -3]  # the third-ranked class
    fmodel = fb.PyTorchModel(model, bounds=WIDE.pixel_bounds)
    _, adversarial, success = ALMAL2Attack(steps=200)(fmodel, x, fb.criteria.TargetedMisclassification(target), epsilons=None)
    assert success.all()
    with torch.no_grad():
        assert (model(adversarial).argmax(1) == target).all()
    weight = model[1].weight
    rows = torch.arange(len(x))
    bound = (logits[rows, clean] - logits[rows, target]) / (weight[clean] - weight[target]).norm(dim=1)
    assert ((adversarial - x).flatten(1).norm(dim=1) >= bound * (1 - 1e-4)).all()


def test_an_image_alma_cannot_flip_is_a_verified_failure_not_a_success() -> None:
    """One step of length 1e-3 cannot reach a boundary at distance ~1: ``x`` comes back and
    the verification counts a failure."""
    model, x = binary_affine_model(), affine_images(n=5)
    ds = run_attack(model, x, WIDE, attack="ALMAL2Attack", kwargs={"steps": 1, "init_epsilon": 1e-3}, store_adversarials=True)
    assert not ds["success"].values.any()
    assert np.isnan(ds["perturbation_norm"].values).all()


def test_alma_is_deterministic() -> None:
    model, x = affine_model(), affine_images(n=8)
    runs = [run_attack(model, x, WIDE, attack="ALMAL2Attack", kwargs={"steps": 50}, store_adversarials=False) for _ in range(2)]
    np.testing.assert_array_equal(runs[0]["perturbation_norm"].values, runs[1]["perturbation_norm"].values)


@pytest.mark.parametrize(
    "kwargs",
    [{"lr_reduction": 2.0}, {"alpha": 1.0}, {"tau": 1.5}, {"gamma": 0.5}, {"steps": 0}, {"init_epsilon": -1.0}, {"check_steps": 0}]
    + [{"learning_rate": 0.1}],
)
def test_bad_alma_keywords_are_config_errors(kwargs: dict) -> None:
    ensemble = {"ALMA": {"attack": "ALMAL2Attack", "kwargs": kwargs, "refine": False}}
    with pytest.raises(ConfigError, match="ALMA"):
        check_ensemble(ensemble)


def test_a_vanishing_gradient_steps_in_a_random_direction_of_the_asked_length() -> None:
    """A saturated model gives no first direction (a zero gradient); ALMA still moves by
    ``init_epsilon``, in a seeded random direction."""
    x = torch.full((3, 1, 2, 2), 0.5)
    velocity = torch.zeros_like(x)
    eta = ALMAL2Attack(steps=1, init_epsilon=0.2)._initial_step_size(x, velocity, torch.Generator().manual_seed(0), (0.0, 1.0))
    assert (velocity.flatten(1).norm(dim=1) > 0).all()
    moved = ((x - eta.view(-1, 1, 1, 1) * velocity).clamp(0, 1) - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(moved, torch.full((3,), 0.2), rtol=1e-4, atol=0)
