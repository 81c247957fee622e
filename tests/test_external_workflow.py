"""models.external through the whole DAG with real Snakemake: a trained grid beside two
external checkpoints (an affine model with closed-form robustness, and an MNIST-style CNN) on a
tiny fake CIFAR-10, and what a change of weights, attributes or timestamps reruns."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
from torch import nn

from conftest import affine_boundary_tolerance, assert_within, float_tolerance, quotient_tolerance, write_fake_cifar10
from saliency_robustness.models import ModelSpec, build_model
from test_workflow import planned_jobs, snakemake

pytestmark = pytest.mark.workflow

AFFINE_MODULE = '''
"""A user's own architecture, importable as affine_zoo:affine."""
from torch import nn


def affine(in_features: int, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
'''
EXPERIMENT = "external-test"
MODELS = ["gradnorm-lambda0-seed0", "affine", "cnn"]


def mixed_config(data_root: Path, **attributes: dict) -> dict:
    """One trained model beside two external ones, on the fake CIFAR-10 (budgets as in smoke.yaml)."""
    return {
        "experiment": EXPERIMENT,
        "data_root": str(data_root),
        "dataset": {"kind": "cifar10", "n_eval": 8},
        "model": {"architecture": "mnist_cnn", "in_channels": 3, "image_size": 32},
        "train": {"lambdas": [0.0], "epochs": 1, "batch_size": 20, "optimizer": "adam", "learning_rate": 0.002},
        "models": {
            "external": [
                {
                    "name": "affine",
                    "architecture": "affine_zoo:affine",
                    "options": {"in_features": 3 * 32 * 32},
                    "weights": "checkpoints/affine.pt",
                    "attributes": attributes.get("affine", {"source": "closed form", "eps": 0.5}),
                },
                {"name": "cnn", "architecture": "mnist_cnn", "weights": "checkpoints/cnn.pt", "attributes": {"source": "own"}},
            ]
        },
        "attacks": {
            "batch_size": 8,
            "ensemble": {
                "DeepFool": {"attack": "L2DeepFoolAttack", "kwargs": {"steps": 10, "candidates": 4, "overshoot": 0.02, "boundary_search_steps": 8}},
                "DDN": {"attack": "DDNAttack", "kwargs": {"steps": 30}},
                "FMN": {"attack": "L2FMNAttack", "kwargs": {"steps": 10, "binary_search_steps": 8}, "refine": True},
            },
        },
        "figures": {"gallery_samples": 4, "dpi": 60},
    }


@pytest.fixture(scope="module")
def external_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("external")
    data_root = root / "data"
    # pixels in [0.3, 0.7]: the nearest boundary point of the affine model stays inside the box
    write_fake_cifar10(data_root, batch_size=20, n_test=16, pixel_range=(77, 178))
    (data_root / "checkpoints").mkdir()
    torch.manual_seed(0)
    affine = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    torch.save(affine.state_dict(), data_root / "checkpoints" / "affine.pt")
    cnn = build_model(
        ModelSpec(
            name="cnn",
            architecture="mnist_cnn",
            method="gradnorm",
            strength=0.0,
            in_channels=3,
            image_size=32,
            seed=3,
            sensitivity="loss",
            p=2.0,
            num_classes=10,
        )
    )
    torch.save(cnn.state_dict(), data_root / "checkpoints" / "cnn.pt")
    user_code = root / "user_code"
    user_code.mkdir()
    (user_code / "affine_zoo.py").write_text(textwrap.dedent(AFFINE_MODULE))
    env = {**os.environ, "PYTHONPATH": str(user_code)}
    configfile = root / "mixed.yaml"
    configfile.write_text(yaml.safe_dump(mixed_config(data_root)))
    workdir = root / "work"
    workdir.mkdir()
    result = snakemake(workdir, configfile, data_root=None, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return {"root": root, "workdir": workdir, "data_root": data_root, "configfile": configfile, "env": env, "affine": affine}


def out(run: dict) -> Path:
    return run["workdir"] / "results" / EXPERIMENT


def test_a_trained_grid_and_two_external_checkpoints_run_end_to_end(external_run: dict) -> None:
    results = out(external_run)
    assert (results / "models" / "gradnorm-lambda0-seed0" / "training_log.csv").exists()
    for name in ("affine", "cnn"):
        assert not (results / "models" / name / "training_log.csv").exists()  # not trained
        assert (results / "logs" / "external" / f"{name}.log").read_text()
    summary = xr.open_zarr(results / "summary.zarr")
    assert list(summary["model"].values) == MODELS
    assert list(summary["method"].values) == ["gradnorm", "external", "external"]
    assert list(summary["source"].values) == ["", "closed form", "own"]
    np.testing.assert_array_equal(summary["eps"].values, [np.nan, 0.5, np.nan])
    assert np.isnan(summary["strength"].sel(model="affine"))
    table = pd.read_csv(results / "summary.csv", keep_default_na=False).query("subset == 'all'")
    assert list(table["source"]) == ["", "closed form", "own"]  # the attributes are columns of summary.csv too
    for name in MODELS:
        xr.open_zarr(results / "metrics" / f"{name}.zarr")  # every store opens
    assert sorted(p.name for p in (results / "figures").glob("*.png"))


def test_the_affine_ground_truth_holds_through_the_whole_dag(external_run: dict) -> None:
    """For an affine model the distance to the decision boundary is ``min_j (Ψ^c - Ψ^j) / ‖w_c - w_j‖``
    (no box constraint binds): ρ̃ equals it, the verified attacks come within their tolerance of it
    and never below, and the saliency map is the predicted class's weight row."""
    results = out(external_run)
    images = xr.open_zarr(results / "data" / "eval.zarr")["images"].values.astype(np.float64)
    linear = external_run["affine"][1]
    w, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    x = images.reshape(len(images), -1)
    logits = x @ w.T + b
    c = logits.argmax(1)
    distances = np.full((len(x), 10), np.inf)
    for k in range(len(x)):
        for j in range(10):
            if j != c[k]:
                d = w[c[k]] - w[j]
                distances[k, j] = (logits[k, c[k]] - logits[k, j]) / np.linalg.norm(d)
                nearest = x[k] - distances[k, j] * d / np.linalg.norm(d)
                assert 0 < nearest.min() and nearest.max() < 1  # the box does not bind: the closed form holds
    rho = distances.min(1)
    metrics = xr.open_zarr(results / "metrics" / "affine.zarr")
    np.testing.assert_array_equal(metrics["prediction"].values, c)
    # the model computes in float32: its logit differences (of ~1e-2 from logits of ~1) move the boundary by the
    # rounding of 3073-term sums; ||w_c - w_j|| from float32 gradient rows, one rounding each
    boundary = affine_boundary_tolerance(w, b, x)
    assert_within(metrics["linearized_robustness"].values, rho, boundary + rho * float_tolerance(np.float32, 1.0))
    attacked = metrics["robustness"].values
    # a verified adversarial cannot beat the true distance, but for the float32 rounding of both boundaries
    assert np.all(attacked >= rho - affine_boundary_tolerance(w, b, x, attacked))
    np.testing.assert_allclose(attacked, rho, rtol=1e-2)  # not a rounding tolerance: the attacks' own
    saliency = xr.open_zarr(results / "saliency" / "affine.zarr")["saliency"].values.reshape(len(x), -1)
    row = float_tolerance(np.float32, 1.0, terms=10)  # relative: the weight row through a one-hot of 10 classes, float32
    assert_within(saliency, w[c], row * np.abs(w[c]))
    inner, norm = (np.abs(x) * np.abs(w[c])).sum(1), np.linalg.norm(w[c], axis=1)
    alignment = np.abs((x * w[c]).sum(1)) / norm
    d = x.shape[1]  # float64 sums of d terms in other orders, on the float32 saliency
    inner_tolerance = row * inner + float_tolerance(np.float64, inner, terms=d)
    relative = row + float_tolerance(np.float64, 1.0, terms=d + 1)
    assert_within(metrics["alignment"].values, alignment, quotient_tolerance(inner_tolerance, alignment, norm, relative))


def dry_run(run: dict, configfile: Path | None = None) -> dict[str, int]:
    return planned_jobs(snakemake(run["workdir"], configfile or run["configfile"], "--dry-run", data_root=None, env=run["env"]))


def test_weights_are_identified_by_content_so_one_edit_reruns_that_model_only(external_run: dict, tmp_path: Path) -> None:
    assert dry_run(external_run) == {}
    checkpoint = external_run["data_root"] / "checkpoints" / "affine.pt"
    os.utime(checkpoint)  # a newer time, the same content
    assert dry_run(external_run) == {}
    cnn = external_run["data_root"] / "checkpoints" / "cnn.pt"
    original = cnn.read_bytes()
    state = torch.load(cnn, weights_only=True)
    state["classifier.4.bias"] += 1.0
    torch.save(state, cnn)
    try:
        jobs = dry_run(external_run)
    finally:
        cnn.write_bytes(original)
    assert jobs == {"external": 1, "saliency": 1, "attack": 3, "metrics": 1, "summary": 1, "figure": jobs["figure"]}, jobs
    moved = mixed_config(external_run["data_root"])
    (external_run["data_root"] / "elsewhere").mkdir(exist_ok=True)
    (external_run["data_root"] / "elsewhere" / "affine.pt").write_bytes(checkpoint.read_bytes())
    moved["models"]["external"][0]["weights"] = str(external_run["data_root"] / "elsewhere" / "affine.pt")  # absolute, another folder
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(moved))
    assert dry_run(external_run, tmp_path / "moved.yaml") == {}  # where the weights lie is not what they are
    relabelled = tmp_path / "relabelled.yaml"
    relabelled.write_text(yaml.safe_dump(mixed_config(external_run["data_root"], affine={"source": "renamed"})))
    assert dry_run(external_run, relabelled) == {"summary": 1, "figure": dry_run(external_run, relabelled)["figure"]}


def test_a_missing_weights_file_stops_the_run_in_one_line(external_run: dict, tmp_path: Path) -> None:
    config = mixed_config(external_run["data_root"])
    config["models"]["external"][1]["weights"] = "checkpoints/typo.pt"
    configfile = tmp_path / "typo.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake(external_run["workdir"], configfile, "--dry-run", data_root=None, env=external_run["env"])
    assert result.returncode != 0
    expected = f"error: external model 'cnn': weights file {external_run['data_root'] / 'checkpoints' / 'typo.pt'} not found"
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
