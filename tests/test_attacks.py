"""The attack ensemble (docs/spec.md §4): exact distances of an affine model, our own verification,
and one regression test per Foolbox 3.3.4 trap (each fails on Foolbox's behaviour)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import eagerpy as ep
import foolbox as fb
import numpy as np
import pytest
import torch
import xarray as xr
from foolbox.attacks.base import MinimizationAttack
from torch import nn

from conftest import WIDE, affine_images, affine_model, assert_within, distance_tolerance, exact_robustness, float_tolerance, mnist_cnn_spec
from saliency_robustness.config import load_config
from saliency_robustness.data import InputSpace, eval_dataset
from saliency_robustness.ensemble import ATTACKS, best_adversarials, make_attack, run_attack, run_ensemble, verify_adversarials
from saliency_robustness.errors import ConfigError
from saliency_robustness.foolbox_fixes import CorrectedL2FMNAttack, GuardedL2CarliniWagnerAttack
from saliency_robustness.models import build_model, save_model
from saliency_robustness.robustness import combine_attacks, smallest_verified
from saliency_robustness.stages.attacks import attack_stage
from saliency_robustness.stores import open_store, write_store

REPO = Path(__file__).resolve().parents[1]
def config_ensemble(config: str = "config/config.yaml") -> dict[str, dict]:
    return load_config(REPO / config)["attacks"]["ensemble"]


@pytest.fixture(scope="module")
def affine_results() -> tuple[np.ndarray, dict[str, xr.Dataset]]:
    """The default config's ensemble, run as the workflow runs it, on the affine model."""
    model, x = affine_model(), affine_images()
    results = run_ensemble(model, x, WIDE, config_ensemble(), batch_size=25, device="cpu")
    return exact_robustness(model, x), results


def test_the_exact_projection_stays_inside_the_wide_bounds() -> None:
    """Otherwise the box would bind and rho would not be the hyperplane distance."""
    model, x = affine_model(), affine_images()
    rho = exact_robustness(model, x)
    assert float((x.abs().amax(dim=(1, 2, 3)).numpy() + rho).max()) < WIDE.pixel_bounds[1]


def test_every_attack_is_bounded_below_by_the_exact_distance(affine_results) -> None:
    rho, results = affine_results
    for name, ds in results.items():
        norms = ds["perturbation_norm"].values
        found = np.isfinite(norms)
        assert found.sum() >= 25, name
        assert (norms[found] >= rho[found] - distance_tolerance(affine_model(), affine_images(), norms)[found]).all(), name


def test_default_ensemble_is_within_one_percent_of_the_exact_distance(affine_results) -> None:
    rho, results = affine_results
    robustness = combine_attacks(results)["robustness"].values
    assert np.mean(robustness <= 1.01 * rho) >= 0.95


class ClaimsSuccessOnUnchangedImages(MinimizationAttack):
    """A broken attack: returns the clean images and says it succeeded everywhere."""

    distance = fb.distances.l2

    def run(self, model, inputs, criterion, *, early_stop=None, **kwargs):  # noqa: ANN001, ANN201
        return inputs

    def __call__(self, model, inputs, criterion, *, epsilons, **kwargs):  # noqa: ANN001, ANN201
        return inputs, inputs, torch.ones(len(inputs), dtype=torch.bool)


def test_a_claimed_success_on_an_unchanged_image_is_rejected() -> None:
    model, x = affine_model(), affine_images(10)
    ds = run_attack(model, x, WIDE, attack=ClaimsSuccessOnUnchangedImages(), device="cpu", store_adversarials=True)
    assert ds["claimed_success"].values.all()
    assert not ds["success"].values.any()
    assert np.isnan(ds["perturbation_norm"].values).all()
    assert np.isnan(ds["adversarial"].values).all()
    assert ds.attrs["claimed_successes"] == 10 and ds.attrs["verified_successes"] == 0


class RecordsTF32(nn.Module):
    """The affine model, recording whether TF32 was allowed at each call."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = affine_model()
        self.tf32: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.tf32.append(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32)
        return self.inner(x)


def test_attacks_and_their_verification_run_without_tf32() -> None:
    """On a GPU, cuDNN's default TF32 would find and verify adversarials under other
    arithmetic than the full-float32 metrics; the flags are restored afterwards."""
    model, before = RecordsTF32(), torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        run_attack(model, affine_images(4), WIDE, attack="DDNAttack", kwargs={"steps": 3}, device="cpu", store_adversarials=True)
        assert model.tf32 and not any(model.tf32)
        assert torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_verification_checks_bounds_and_recomputes_the_norm() -> None:
    model, x = affine_model(), affine_images(4)
    clean = model(x).argmax(1)
    direction = torch.zeros_like(x)
    direction[:, 0, 0, 0] = 1.0
    # far along one pixel: every image changes class, with norm exactly 30 (outside [0, 1] bounds)
    x_adv = x + 30.0 * torch.sign(model[1].weight[(clean + 1) % 10, 0] - model[1].weight[clean, 0]).view(-1, 1, 1, 1) * direction
    flipped = model(x_adv).argmax(1) != clean
    success, norms, prediction = verify_adversarials(model, x, x_adv, clean, (-100.0, 100.0))
    assert torch.equal(success, flipped) and flipped.any()
    # one float32 rounding of x + 30 in one pixel; the norm is taken in float64
    assert_within(norms[success], 30.0, float_tolerance(torch.float32, 30.0, x.abs().max()))
    assert torch.equal(prediction, model(x_adv).argmax(1))
    success, norms, _ = verify_adversarials(model, x, x_adv, clean, (0.0, 1.0))
    assert not success.any() and torch.isnan(norms).all()
    nan = torch.full_like(x, math.nan)
    success, _, prediction = verify_adversarials(model, x, nan, clean, (0.0, 1.0))
    assert not success.any() and (prediction == -1).all()


def zero_image_is_misclassified() -> tuple[nn.Module, torch.Tensor]:
    """Images whose prediction differs from the prediction on the all-zero image."""
    model, x = affine_model(seed=3), affine_images(40)
    with torch.no_grad():
        model[1].bias[0] += 50.0  # the zero image is class 0
        model[1].weight[0] -= 10.0  # ... and these images are not
        keep = model(x).argmax(1) != model(torch.zeros_like(x[:1])).argmax(1)
    return model, x[keep]


def test_carlini_wagner_failure_is_not_a_zero_image_success() -> None:
    model, x = zero_image_is_misclassified()
    space = InputSpace(pixel_offset=(0.0,), pixel_bounds=(0.0, 1.0))
    assert len(x) >= 10
    budget = {"binary_search_steps": 1, "steps": 1}  # CW finds nothing with one step
    original = run_attack(model, x, space, attack=fb.attacks.L2CarliniWagnerAttack(**budget), device="cpu", store_adversarials=True)
    # the trap: Foolbox returns the zero image, which passes as a success of norm ||x||
    assert original["success"].values.all()
    image_norm = x.flatten(1).double().norm(dim=1).numpy()  # ||0 - x||: float64 norms of the same D terms
    assert_within(original["perturbation_norm"].values, image_norm, float_tolerance(np.float64, image_norm, terms=x[0].numel()))
    guarded = run_attack(model, x, space, attack="L2CarliniWagnerAttack", kwargs=budget, device="cpu", store_adversarials=True)
    assert isinstance(make_attack("L2CarliniWagnerAttack"), GuardedL2CarliniWagnerAttack)
    assert not guarded["success"].values.any()
    assert not guarded["claimed_success"].values.any()


def test_guarded_carlini_wagner_changes_nothing_but_the_failures() -> None:
    model, x = affine_model(), affine_images(20)
    rho = exact_robustness(model, x)
    # bounds that do not bind, narrow enough for CW's tanh box to move freely
    space = InputSpace(pixel_offset=(0.0,), pixel_bounds=(-1.0, 2.0))
    kwargs = {"binary_search_steps": 6, "steps": 100, "stepsize": 0.01, "abort_early": False}
    guarded = run_attack(model, x, space, attack="L2CarliniWagnerAttack", kwargs=kwargs, device="cpu", store_adversarials=True)
    original = run_attack(model, x, space, attack=fb.attacks.L2CarliniWagnerAttack(**kwargs), device="cpu", store_adversarials=True)
    assert guarded["success"].values.all()
    np.testing.assert_array_equal(guarded["perturbation_norm"].values, original["perturbation_norm"].values)
    assert np.median(guarded["perturbation_norm"].values / rho) < 1.01


def test_fmn_projects_onto_the_l2_ball() -> None:
    g = torch.Generator().manual_seed(0)
    origin = torch.rand(5, 1, 4, 4, generator=g)
    x = origin + torch.randn(5, 1, 4, 4, generator=g)
    epsilon = torch.tensor([0.1, 0.5, 1.0, 2.0, 100.0])
    expected = torch.minimum(epsilon, (x - origin).flatten(1).norm(dim=1))

    def projected_distance(attack: MinimizationAttack) -> torch.Tensor:
        projected = attack.project(ep.astensor(x), ep.astensor(origin), ep.astensor(epsilon)).raw
        return (projected - origin).flatten(1).norm(dim=1)

    # float32 throughout: a few elementwise roundings at |origin| + |x - origin| and three norms of 16 terms
    tolerance = float_tolerance(torch.float32, (origin.abs() + (x - origin).abs()).flatten(1).norm(dim=1), terms=16 + 5)
    assert isinstance(make_attack("L2FMNAttack"), CorrectedL2FMNAttack)
    assert_within(projected_distance(make_attack("L2FMNAttack")), expected, tolerance)
    # the trap: Foolbox 3.3.4 computes norms / norms and never projects
    assert_within(projected_distance(fb.attacks.L2FMNAttack()), (x - origin).flatten(1).norm(dim=1), tolerance)


def test_corrected_fmn_is_tight_where_the_original_is_not() -> None:
    model, x = affine_model(), affine_images(30)
    rho = exact_robustness(model, x)
    corrected = run_attack(model, x, WIDE, attack="L2FMNAttack", kwargs={"steps": 30}, device="cpu", store_adversarials=True)
    original = run_attack(model, x, WIDE, attack=fb.attacks.L2FMNAttack(steps=30), device="cpu", store_adversarials=True)
    ratio = corrected["perturbation_norm"].values / rho
    assert np.nanmedian(ratio) < 1.01 and np.isfinite(ratio).mean() >= 0.9
    assert np.nanmedian(original["perturbation_norm"].values / rho) > 1.01


def test_deepfool_boundary_search_removes_the_overshoot() -> None:
    model, x = affine_model(), affine_images(30)
    rho = exact_robustness(model, x)
    kwargs = {"steps": 10, "candidates": 10, "overshoot": 0.02}
    plain = run_attack(model, x, WIDE, attack="L2DeepFoolAttack", kwargs=kwargs, device="cpu", store_adversarials=True)
    trimmed = run_attack(model, x, WIDE, attack="L2DeepFoolAttack", kwargs={**kwargs, "boundary_search_steps": 12},
            device="cpu", store_adversarials=True)
    # Foolbox's last iterate overshoots by ~2%; verification accepts it as an upper bound
    assert np.median(plain["perturbation_norm"].values / rho) > 1.015
    norms = trimmed["perturbation_norm"].values
    assert trimmed["success"].values.all() and (norms >= rho - distance_tolerance(model, x, norms)).all() and np.median(norms / rho) < 1.002


def test_translation_of_the_input_space_leaves_the_distances_unchanged() -> None:
    """Attacks run on pixels = x + offset; the adversarials come back in the input space."""
    model, x = affine_model(), affine_images(20)
    shifted = InputSpace(pixel_offset=(0.5,), pixel_bounds=(-19.5, 20.5))
    kwargs = {"steps": 10, "boundary_search_steps": 12}
    plain = run_attack(model, x, WIDE, attack="L2DeepFoolAttack", kwargs=kwargs, device="cpu", store_adversarials=True)
    moved = run_attack(model, x, shifted, attack="L2DeepFoolAttack", kwargs=kwargs, device="cpu", store_adversarials=True)
    # not only rounding: where the translation's rounding flips one bisection step, the two end within one final
    # bracket, 2^-12 of DeepFool's own step, of the boundary; plus the float32 rounding of x + 0.5 and of the logits
    untrimmed = run_attack(model, x, WIDE, attack="L2DeepFoolAttack", kwargs={"steps": 10}, device="cpu", store_adversarials=True)[
        "perturbation_norm"
    ].values
    norms = plain["perturbation_norm"].values
    rounding = float_tolerance(torch.float32, (x.abs() + 0.5).flatten(1).norm(dim=1).numpy(), terms=2) + distance_tolerance(model, x, norms)
    assert_within(moved["perturbation_norm"].values, norms, 2.0 ** -kwargs["boundary_search_steps"] * untrimmed + rounding)
    with torch.no_grad():
        prediction = model(torch.from_numpy(moved["adversarial"].values)).argmax(1).numpy()
    np.testing.assert_array_equal(prediction, moved["adversarial_prediction"].values)
    assert (prediction != moved["clean_prediction"].values).all()


def test_unknown_attack_or_keyword_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown attack class"):
        make_attack("L2Nonsense")
    with pytest.raises(ConfigError, match="bad keyword"):
        make_attack("L2FMNAttack", {"stepz": 3})


def test_combine_attacks_takes_the_smallest_verified_norm() -> None:
    def store(norms: list[float]) -> xr.Dataset:
        return xr.Dataset(
            {
                "perturbation_norm": ("sample", np.array(norms)),
                "clean_prediction": ("sample", np.zeros(len(norms), dtype=np.int64)),
            },
            coords={"sample": [10, 11, 12]},
        )

    ds = combine_attacks({"a": store([1.0, np.nan, np.nan]), "b": store([2.0, 0.5, np.nan])})
    np.testing.assert_array_equal(ds["robustness"].values, [1.0, 0.5, np.nan])
    assert list(ds["robustness_attack"].values) == ["a", "b", "none"]
    assert ds["attack_perturbation_norm"].dims == ("sample", "attack")
    assert list(ds["attack"].values) == ["a", "b"] and list(ds["sample"].values) == [10, 11, 12]
    assert ds.attrs["attack_failures"] == 1 and ds["robustness"].attrs["attack_failures"] == 1
    for var in ds.data_vars.values():
        assert {"units", "long_name"} <= set(var.attrs)


@pytest.mark.filterwarnings("ignore:At the first initialisation:UserWarning")
def test_registry_names_the_config_classes() -> None:
    for config in ("config/config.yaml", "config/smoke.yaml", "config/paper-mnist.yaml"):
        ensemble = config_ensemble(config)
        assert {spec["attack"] for spec in ensemble.values()} <= set(ATTACKS), config
        for spec in ensemble.values():
            if importlib.util.find_spec("numba") is not None or spec["attack"] != "L2BrendelBethgeAttack":
                make_attack(spec["attack"], spec.get("kwargs"))


@pytest.fixture()
def tiny_stage(tmp_path: Path) -> tuple[Path, Path]:
    """A freshly initialised 8x8 MNIST-architecture model and a 12-image evaluation store."""
    spec = mnist_cnn_spec("tiny", image_size=8)
    model = build_model(spec)
    with torch.no_grad():  # without biases its decision boundaries cross the [0, 1] box
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    save_model(model, spec, model_dir)
    x = affine_images(12)
    eval_store = write_store(eval_dataset(x, np.zeros(12), np.arange(12), InputSpace(pixel_offset=(0.0,))), tmp_path / "eval.zarr")
    return model_dir, eval_store


def stage_settings(name: str, attack: str, kwargs: dict, refine: bool = False) -> dict:
    return {"name": name, "attack": attack, "kwargs": kwargs, "refine": refine, "batch_size": 5, "store_adversarials": True}


def test_attack_stage_writes_a_verified_store_and_refines_from_it(tiny_stage, tmp_path: Path) -> None:
    model_dir, eval_store = tiny_stage
    first = tmp_path / "attacks" / "tiny" / "DeepFool.zarr"
    attack_stage(
        model_dir=model_dir,
        eval_store=eval_store,
        output=first,
        settings=stage_settings("DeepFool", "L2DeepFoolAttack", {"steps": 20, "overshoot": 0.3}),
    )
    ds = open_store(first, ["perturbation_norm", "success", "claimed_success", "adversarial_prediction", "clean_prediction", "adversarial"])
    assert ds["adversarial"].dims == ("sample", "channel", "y", "x")
    assert ds.attrs["attack_class"] == "L2DeepFoolAttack" and "git_commit" in ds.attrs
    assert ds.attrs["verified_successes"] == int(ds["success"].sum()) > 0
    for var in ds.data_vars.values():
        assert {"units", "long_name"} <= set(var.attrs)
    starts, start_norms = best_adversarials({"DeepFool": ds})
    assert np.isfinite(start_norms).sum() == ds.attrs["verified_successes"]

    # a refining attack starts from those adversarials (FMN accepts starting points too)
    refined = tmp_path / "attacks" / "tiny" / "Refined.zarr"
    attack_stage(
        model_dir=model_dir,
        eval_store=eval_store,
        output=refined,
        settings=stage_settings("Refined", "L2FMNAttack", {"steps": 10}, refine=True),
        start_stores=[first],
    )
    out = open_store(refined)
    assert out.attrs["refined_from_starting_points"] == 1
    skipped = ~np.isfinite(start_norms)
    assert not out["claimed_success"].values[skipped].any()
    found = out["success"].values
    # FMN keeps the start unless it finds a smaller float32 norm (of D terms); the stored norms are float64
    slack = float_tolerance(torch.float32, start_norms[found], terms=starts[0].size)
    assert (out["perturbation_norm"].values[found] <= start_norms[found] + slack).all()


@pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="Brendel-Bethge needs numba (extra 'refine')")
def test_brendel_bethge_refines_deepfool_on_the_affine_model() -> None:
    """Needs numba, which compiles Brendel-Bethge's solver on first use (about a minute)."""
    model, x = affine_model(), affine_images(10)
    rho = exact_robustness(model, x)
    deepfool = run_attack(model, x, WIDE, attack="L2DeepFoolAttack", kwargs={"steps": 10, "overshoot": 0.3}, device="cpu", store_adversarials=True)
    starts = torch.from_numpy(deepfool["adversarial"].values)
    starts[:2] = math.nan  # no start: skipped
    ds = run_attack(
        model, x, WIDE, attack="L2BrendelBethgeAttack", kwargs={"steps": 20}, starting_points=starts, device="cpu", store_adversarials=True
    )
    assert not ds["claimed_success"].values[:2].any() and np.isnan(ds["perturbation_norm"].values[:2]).all()
    norms = ds["perturbation_norm"].values[2:]
    assert (norms >= rho[2:] - distance_tolerance(model, x[2:], norms)).all() and np.median(norms / rho[2:]) < 1.01


def test_brendel_bethge_without_refine_is_a_config_error(tiny_stage, tmp_path: Path) -> None:
    model_dir, eval_store = tiny_stage
    with pytest.raises(ConfigError, match="refine: true"):
        attack_stage(
            model_dir=model_dir,
            eval_store=eval_store,
            output=tmp_path / "bb.zarr",
            settings=stage_settings("BB", "L2BrendelBethgeAttack", {}),
        )


def test_smallest_verified_picks_the_smallest_finite_norm_per_sample() -> None:
    nan = math.nan
    norms = np.array([[2.0, nan, nan, 0.5], [1.0, 3.0, nan, 0.7]])  # (attack, sample)
    best, smallest = smallest_verified(norms, axis=0)
    np.testing.assert_array_equal(best[[0, 1, 3]], [1, 1, 0])
    np.testing.assert_array_equal(smallest, [1.0, 3.0, nan, 0.5])
    best_t, smallest_t = smallest_verified(norms.T, axis=1)
    np.testing.assert_array_equal(best_t, best)
    np.testing.assert_array_equal(smallest_t, smallest)
