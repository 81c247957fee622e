"""train.vectorized: a grid trained as one vectorised stack (torch.func) equals the
per-model path: each model's parameter gradient, and a few steps of training."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from conftest import assert_within, float_tolerance, reduction_terms
from saliency_robustness.config import validate_config
from saliency_robustness.errors import ConfigError
from saliency_robustness.regularizers import regularized_loss
from saliency_robustness.stages.training import fit
from saliency_robustness.vectorized import StackedModels, fit_vectorized

LAMS = (0.0, 0.5, 2.0)


def dropout_free_models() -> list[nn.Module]:
    """Three models of one architecture from three seeds (no dropout: its draws differ by design)."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 3)
            )
        )
    return models


def step_terms(model: nn.Module, batch: int) -> int:
    """The reduction length of one gradient of the regularized loss (:func:`float_tolerance`): the penalty's
    input gradient differentiated again runs through the forward and backward passes twice; then the batch mean."""
    return 2 * reduction_terms(model) + batch


def gradient_scales(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **loss: object) -> dict[str, float]:
    """Per parameter tensor, the largest ``sum_e |gradient of example e| / batch``: the operands of the batch mean
    that the gradient is, normwise (rounding inside one example's passes mixes a tensor's elements)."""
    totals: dict[str, torch.Tensor] = {}
    for e in range(len(x)):
        model.zero_grad()
        regularized_loss(model, x[e : e + 1], y[e : e + 1], penalty_gradient="exact", finite_difference_step=0.01, **loss).loss.backward()  # type: ignore[arg-type]
        for name, param in model.named_parameters():
            totals[name] = totals.get(name, 0) + param.grad.abs() / len(x)
    return {name: float(total.max()) for name, total in totals.items()}


def train_config(**overrides: object) -> dict:
    return validate_config({"experiment": "t", "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.05, "weight_decay": 1e-3, **overrides}})[
        "train"
    ]


@pytest.mark.parametrize(("sensitivity", "p"), [("loss", 2.0), ("logit", 1.0)])
def test_every_models_gradient_equals_the_per_model_loop(sensitivity: str, p: float) -> None:
    models = dropout_free_models()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 6, 1, 8, 8, generator=g), torch.randint(0, 3, (3, 6), generator=g)
    stack = StackedModels([copy.deepcopy(m) for m in models], train_config(sensitivity=sensitivity, p=p), LAMS, torch.device("cpu"))
    grads, values = stack.gradients(x, y)
    for m, (model, lam) in enumerate(zip(models, LAMS)):
        scales = gradient_scales(model, x[m], y[m], lam=lam, sensitivity=sensitivity, p=p)
        n = step_terms(model, len(x[m]))
        model.zero_grad()
        terms = regularized_loss(model, x[m], y[m], lam=lam, sensitivity=sensitivity, p=p, penalty_gradient="exact", finite_difference_step=0.01)
        terms.loss.backward()
        for name, param in model.named_parameters():
            assert_within(grads[name][m], param.grad, float_tolerance(torch.float32, scales[name], terms=n), err_msg=name)
        # cross-entropy logsumexp - logit_y (each within max |logit| + log C), averaged, plus lambda times the penalty (in the loss)
        with torch.no_grad():
            operands = float(terms.loss) + 2 * float(model(x[m]).abs().amax(dim=1).mean()) + np.log(3)
        assert_within(float(values[m, 0]), float(terms.loss.detach()), float_tolerance(torch.float32, operands, terms=n))


def test_a_few_epochs_of_vectorized_training_match_per_model_training() -> None:
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.rand(60, 1, 8, 8, generator=g), torch.randint(0, 3, (60,), generator=g))
    subsets = [Subset(ds, list(range(s, 60, 2))[:24]) for s in (0, 1, 0)]  # each model its own training set
    seeds = [0, 1, 2]
    models = dropout_free_models()
    singles = [copy.deepcopy(m) for m in models]
    train = train_config()
    initial = [copy.deepcopy(m.state_dict()) for m in models]
    logs = fit_vectorized(models, subsets, train, LAMS, seeds, device=torch.device("cpu"))
    for m, (single, seed) in enumerate(zip(singles, seeds)):
        rows = fit(single, subsets[m], {**train, "seed": seed}, LAMS[m], device=torch.device("cpu"))
        assert len(rows) == len(logs[m]) == 2 * 3
        # the two runs round differently at every step: S steps' roundings add up (terms = S x one step's); they
        # happen at the scale of the parameters (the updates lr |v| are far smaller) and of the logged loss
        n = len(rows) * step_terms(single, train["batch_size"])
        for ours, theirs in zip(logs[m], rows):
            assert ours.keys() == theirs.keys()
            assert_within(ours["loss"], theirs["loss"], float_tolerance(torch.float32, theirs["loss"], terms=n))
            assert (ours["penalty"] != ours["penalty"]) == (theirs["penalty"] != theirs["penalty"])  # NaN alike at lambda = 0
        for (name, value), reference in zip(models[m].state_dict().items(), single.state_dict().values()):
            scale = max(float(initial[m][name].abs().max()), float(reference.abs().max()))
            assert_within(value, reference, float_tolerance(torch.float32, scale, terms=n), err_msg=f"model {m}: {name}")


UNSTACKED = [{"penalty_interval": 2}, {"penalty_fraction": 0.5}, {"penalty_gradient": "finite_difference"}, {"accumulation_steps": 2}]


@pytest.mark.parametrize("option", UNSTACKED)
def test_what_the_stack_does_not_train_is_refused_in_one_line(option: dict) -> None:
    ds = TensorDataset(torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,)))
    models = dropout_free_models()
    with pytest.raises(ConfigError, match=f"^train.vectorized trains with .*{next(iter(option))}: ") as info:
        fit_vectorized(models, [ds] * 3, {**train_config(), **option}, LAMS, [0, 1, 2], device=torch.device("cpu"))
    assert "\n" not in str(info.value)


def test_the_vectorized_stage_writes_each_model_directory_as_the_per_model_stage_does(fake_cifar10, tmp_path) -> None:  # noqa: ANN001
    from saliency_robustness.models import load_model
    from saliency_robustness.stages.training import model_spec, train_stage, train_vectorized_stage

    root, _ = fake_cifar10
    config = validate_config(
        {
            "experiment": "t",
            "dataset": {"kind": "cifar10"},
            "model": {"architecture": "mnist_cnn", "in_channels": 3, "image_size": 32},
            "train": {"epochs": 1, "batch_size": 10, "lambdas": [0.0, 0.1], "vectorized": True},
        }
    )
    trains = [{**config["train"], "seed": seed} for seed in (0, 1)]
    specs = [
        model_spec(name=f"m{i}", method="gradnorm", strength=lam, dataset=config["dataset"], model=config["model"], train=t)
        for i, (lam, t) in enumerate(zip((0.0, 0.1), trains))
    ]
    outputs = [tmp_path / "vectorized" / s.name for s in specs]
    train_vectorized_stage(specs=specs, dataset=config["dataset"], trains=trains, data_root=root, outputs=outputs)
    train_stage(spec=specs[1], dataset=config["dataset"], train=trains[1], data_root=root, output=tmp_path / "single")
    for output in outputs:
        assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
        model = load_model(output)
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    ours = (outputs[1] / "training_log.csv").read_text().splitlines()
    assert ours[0] == (tmp_path / "single" / "training_log.csv").read_text().splitlines()[0] and len(ours) == 1 + 3
