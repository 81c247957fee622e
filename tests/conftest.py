"""Shared fixtures: repository paths, the offline MNIST copy, small models; rounding-error tolerances."""

from __future__ import annotations

import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports git

from saliency_robustness.data import InputSpace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# the offline MNIST copy beside the checkout; SALIENCY_ROBUSTNESS_DATA_ROOT overrides it
DATA_ROOT = Path(os.environ.get("SALIENCY_ROBUSTNESS_DATA_ROOT", REPO.parent / "shared" / "data"))


def mnist_cnn_spec(name: str = "tiny", **fields: Any) -> Any:
    """A ``ModelSpec`` of the paper's MNIST CNN, plain (lambda 0, the schema's training
    defaults), on 28x28 images unless ``fields`` say otherwise."""
    from saliency_robustness.models import ModelSpec

    plain = {"method": "gradnorm", "strength": 0.0, "sensitivity": "loss", "p": 2.0, "seed": 0, "num_classes": 10, "in_channels": 1, "image_size": 28}
    return ModelSpec(name=name, architecture="mnist_cnn", **{**plain, **fields})


def write_summary(root: Path, models: list[str], metrics_stores: list[Path], model_dirs: list[Path], options: Any) -> None:
    """Run the summary stage on the models, given in reverse order (stacking must sort them),
    into ``root/summary.zarr`` and its three tables."""
    from saliency_robustness.stages.summary import summary_stage

    order = list(reversed(range(len(models))))
    summary_stage(
        models=[models[i] for i in order],
        metrics_stores=[metrics_stores[i] for i in order],
        model_dirs=[model_dirs[i] for i in order],
        output_zarr=root / "summary.zarr",
        output_csv=root / "summary.csv",
        output_grid_csv=root / "summary_grid.csv",
        output_trends_csv=root / "summary_trends.csv",
        options=options,
    )


# --- rounding-error tolerances -------------------------------------------------------------
# Two results that agree in exact arithmetic but were rounded differently (another batch size, BLAS or
# oneDNN blocking, CPU instruction set, thread count, vmap against a loop, a float64 reference) agree only
# to the rounding error of their arithmetic: never compare them with a constant that merely passed on one CPU.

#: confidence parameter lambda of the probabilistic bound below: it fails with probability <= 2 n exp(-32)
ROUNDING_LAMBDA = 8.0


def float_tolerance(dtype: Any, *operands: Any, terms: float = 1) -> Any:
    """Absolute tolerance for comparing two results, equal in exact arithmetic, that were computed in ``dtype``
    (a torch or numpy dtype) in different orders, or one of them in ``dtype`` and the other in a wider dtype.

    One computation of a sum of ``terms`` rounded terms whose magnitudes add up to ``S = sum(|operands|)`` errs
    by at most ``min(terms, lambda sqrt(terms)) u S`` with ``u = eps / 2``: the worst-case bound gamma_n ~ n u
    (Higham, Accuracy and Stability of Numerical Algorithms, 2002, §3.1) or, for long reductions, the bound
    lambda sqrt(n) u that holds with probability >= 1 - 2 n exp(-lambda^2 / 2) (Higham & Mary, SIAM J. Sci.
    Comput. 41, 2019), lambda = ``ROUNDING_LAMBDA``. Two computations differ by at most twice that.

    ``operands``: magnitudes of what is summed, before any cancellation (for ``a - b``: ``|a|`` and ``|b|``;
    for ``<x, y>``: ``sum_k |x_k y_k|``), numbers or arrays (broadcast into per-element tolerances).
    ``terms``: the length of the reductions; through a network, summed over its layers (``reduction_terms``),
    since the rounding errors of successive layers add up.
    """
    eps = float(torch.finfo(dtype).eps) if isinstance(dtype, torch.dtype) else float(np.finfo(dtype).eps)
    scale = sum(np.abs(np.asarray(op, dtype=np.float64)) for op in operands)
    return 2 * min(terms, ROUNDING_LAMBDA * math.sqrt(terms)) * (eps / 2) * scale


def affine_boundary_tolerance(weight: Any, bias: Any, x: Any, moved: Any = 0.0) -> np.ndarray:
    """Per image, how far the float32 decision boundaries of an affine model ``x -> W x + b`` may lie from the exact
    ones, in input-space distance: a logit difference ``Psi_i - Psi_j`` rounds as float32 sums of D + 1 terms of
    magnitude ``sum_k |W_ck x_k| + |b_c|`` (the two largest classes; at a point ``moved`` away from ``x``, up to
    ``||W_c|| moved`` more), over the smallest ``||W_i - W_j||``; both the rounding at ``x`` and at that point."""
    w, b = (np.asarray(t.detach() if isinstance(t, torch.Tensor) else t, dtype=np.float64) for t in (weight, bias))
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    operands = np.abs(x) @ np.abs(w).T + np.abs(b) + np.reshape(moved, (-1, 1)) * np.linalg.norm(w, axis=1)
    pairs = min(np.linalg.norm(w[i] - w[j]) for i in range(len(w)) for j in range(i))
    return float_tolerance(np.float32, np.sort(operands, axis=1)[:, -2:].sum(axis=1), terms=x.shape[1] + 1) / pairs


# the affine model of the attack tests: its rho is known in closed form
# wide bounds: the box never binds, so the affine model's rho is the distance to a hyperplane
WIDE = InputSpace(pixel_offset=(0.0,), pixel_bounds=(-20.0, 20.0))


def affine_model(seed: int = 0, classes: int = 10, size: int = 8) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(size * size, classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(classes, size * size, generator=g))
        linear.bias.copy_(torch.randn(classes, generator=g))
    return nn.Sequential(nn.Flatten(), linear).eval()


def affine_images(n: int = 50, seed: int = 1, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def exact_robustness(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``rho = min_j (Psi^i - Psi^j) / ||w_i - w_j||``: the exact distance of an affine model."""
    linear = model[1]
    with torch.no_grad():
        logits = model(x).double()
    weight = linear.weight.double()
    prediction = logits.argmax(1)
    rho = []
    for k, i in enumerate(prediction):
        others = [j for j in range(len(weight)) if j != i]
        rho.append(min(((logits[k, i] - logits[k, j]) / (weight[i] - weight[j]).norm()).item() for j in others))
    return np.array(rho)


def distance_tolerance(model: nn.Module, x: torch.Tensor, norms: np.ndarray | float = 0.0) -> np.ndarray:
    """How far below :func:`exact_robustness` (from float32 logits) a verified float32 adversarial of the affine model,
    ``norms`` away from ``x``, may lie: both see boundaries moved by float32 rounding (``affine_boundary_tolerance``)."""
    return affine_boundary_tolerance(model[1].weight, model[1].bias, x, norms)


def reduction_terms(model: nn.Module) -> int:
    """The reduction length of ``model``'s forward and backward passes for :func:`float_tolerance`: the fan-in
    plus the fan-out of every weight (linear and convolution layers), summed over the layers."""
    total = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            receptive_field = weight[0, 0].numel()
            total += (weight.shape[0] + weight.shape[1]) * receptive_field
    return total


def quotient_tolerance(numerator: Any, value: Any, denominator: Any, denominator_relative: Any) -> Any:
    """First-order tolerance of ``value = a / b`` from an absolute tolerance of ``a`` and a relative one of ``b``."""
    return numerator / np.abs(denominator) + np.abs(value) * denominator_relative


class _Decomposition:
    """One forward pass of ``model`` (eval mode, its own dtype) with bias probes, to differentiate outputs of
    its logits with respect to the input and every bias-like parameter (docs/spec.md §2)."""

    def __init__(self, model: nn.Module, images: torch.Tensor) -> None:
        from saliency_robustness.homogeneity import BiasProbes

        self.x = images.to(next(model.parameters()).dtype).clone().requires_grad_(True)
        self.probes = BiasProbes(model)
        with self.probes.attached():
            self.logits = model(self.x)

    def terms(self, output: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Per image, ``sum_k |x_k g_k| + sum_b |b| |d output / db|`` (the terms of ``output = <x, g> + sum_b <b, d output / db>``
        in absolute value) and the input gradient ``g`` (flattened, float64)."""
        g, *probe_grads = torch.autograd.grad(output.sum(), [self.x, *self.probes.tensors], retain_graph=True, materialize_grads=True)
        n = len(self.x)
        g = g.detach().reshape(n, -1).double()
        total = (self.x.detach().reshape(n, -1).double() * g).abs().sum(1)
        for (bias, _), grad in zip(self.probes.records, probe_grads):
            total += grad.reshape(n, -1).double().abs() @ bias.abs()
        return total.numpy(), g


def logit_operands(model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Per image and class ``(sample, class)``, the magnitude that a logit's rounding scales with (for
    :func:`float_tolerance`): ``|Psi^c|`` plus the terms of its decomposition ``Psi^c = <x, dPsi^c/dx> + sum_b <b, dPsi^c/db>``
    in absolute value (the decomposition is exact for networks of ReLU, pooling, linear, convolution and eval-mode
    batch-norm layers). ``model`` in eval mode."""
    passes = _Decomposition(model, images)
    columns = [passes.terms(passes.logits[:, c])[0] for c in range(passes.logits.shape[1])]
    return np.stack(columns, axis=1) + passes.logits.detach().double().abs().numpy()


def decomposition_operands(model: nn.Module, images: torch.Tensor, prediction: Any, runner_up: Any) -> dict[str, np.ndarray]:
    """Per image, the magnitudes that the rounding of docs/spec.md §2's metrics scales with (for :func:`float_tolerance`):
    ``logit``, the two logits of ``Psi† = Psi^i* - Psi^j*`` plus the terms of its decomposition ``Psi† = <x, g†> + sum_b <b, dPsi†/db>``,
    all in absolute value; the norms ``x``, ``g`` (of the saliency ``g_i*``), ``g_dagger`` and ``g_pair = ||g_i*|| + ||g_j*||``
    (the operands of ``g† = g_i* - g_j*``). ``model`` in eval mode."""
    passes = _Decomposition(model, images)
    rows = torch.arange(len(images))
    psi_i, psi_j = passes.logits[rows, torch.as_tensor(np.asarray(prediction))], passes.logits[rows, torch.as_tensor(np.asarray(runner_up))]
    terms, g_dagger = passes.terms(psi_i - psi_j)
    (_, g_i), (_, g_j) = passes.terms(psi_i), passes.terms(psi_j)
    logit = (psi_i.detach().double().abs() + psi_j.detach().double().abs()).numpy() + terms
    norms = {"x": passes.x.detach().reshape(len(images), -1).double(), "g": g_i, "g_dagger": g_dagger}
    return {"logit": logit, "g_pair": (g_i.norm(dim=1) + g_j.norm(dim=1)).numpy(), **{k: v.norm(dim=1).numpy() for k, v in norms.items()}}


def decomposition_tolerance(ds: Any, model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Per image of a metrics dataset ``ds``, how far ``bias_part`` (``Psi† - <x, g†>``) and ``bias_sum``
    (``sum_b <b, dPsi†/db>``), equal in exact arithmetic for a homogeneous network, may differ: the rounding of
    the decomposition's operands in the model's dtype through its layers."""
    dtype = next(model.parameters()).dtype
    operands = decomposition_operands(model.eval(), images, ds["prediction"].values, ds["runner_up"].values)
    return float_tolerance(dtype, operands["logit"], terms=reduction_terms(model))


def linearized_robustness_tolerance(ds: Any, model: nn.Module, images: torch.Tensor) -> np.ndarray:
    """Per image of a float32 metrics dataset ``ds``, how far its ``linearized_robustness`` ``Psi† / ||g_i* - g_j*||`` may be
    from another float32 computation (other batches, or ``|Psi†| / ||g†||`` with ``g†`` from one reverse pass, as the bound
    uses): the rounding of ``Psi†`` (logit units) and of ``g† = g_i* - g_j*`` (relative to ``||g_i*|| + ||g_j*||``)."""
    operands = decomposition_operands(model.eval(), images, ds["prediction"].values, ds["runner_up"].values)
    terms = reduction_terms(model)
    relative = float_tolerance(torch.float32, operands["g_pair"], terms=terms) / operands["g_dagger"]
    logit = float_tolerance(torch.float32, operands["logit"], terms=terms)
    return quotient_tolerance(logit, ds["linearized_robustness"].values, operands["g_dagger"], relative)


def tanh_mlp_operands(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
    """What the rounding of a ``Flatten, Linear, Tanh, Linear`` network scales with: per image and class, its logits'
    ``|W2| (|h| + |W1| |x| + |b1|) + |b2|`` (the second layer's terms, and the first layer's rounding carried through
    tanh' <= 1); per image, class and input, its input gradients' ``|W1|^T (|W2_c| (1 + 2 |h| (|W1| |x| + |b1|)))``
    (the reverse pass's terms; the forward rounding of h enters through 1 - h^2); and the reduction length of both
    passes and their elementwise steps (tanh, 1 - h^2), for :func:`float_tolerance`."""
    first, last = model[1], model[3]
    w1, b1, w2, b2 = (t.detach().abs() for t in (first.weight, first.bias, last.weight, last.bias))
    with torch.no_grad():
        pre = x.flatten(1).abs() @ w1.T + b1  # (sample, hidden)
        h = torch.tanh(first(x.flatten(1))).abs()
    logits = (h + pre) @ w2.T + b2
    gradients = torch.einsum("mk,cm,sm->sck", w1, w2, 1 + 2 * h * pre)
    return logits.numpy(), gradients.numpy(), first.in_features + first.out_features + 3


def assert_within(actual: Any, expected: Any, tolerance: Any, err_msg: str = "") -> None:
    """``|actual - expected| <= tolerance`` element by element (``tolerance`` broadcasts: one per element or
    one for all; NaN only where both are NaN), reporting the worst elements relative to their tolerance."""
    actual, expected, tolerance = np.broadcast_arrays(
        *(np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for v in (actual, expected, tolerance))
    )
    both_nan = np.isnan(actual) & np.isnan(expected)
    error = np.where(both_nan, 0.0, np.abs(actual - expected))
    bad = ~(error <= tolerance)  # NaN against a number is bad
    if bad.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(bad, error / tolerance, -np.inf)
        worst = [tuple(int(i) for i in k) for k in np.argwhere(bad)[np.argsort(-ratio[bad], kind="stable")][:5]]
        lines = [f"{k}: {float(actual[k])!r} vs {float(expected[k])!r}, difference {error[k]:.3g} > tolerance {tolerance[k]:.3g}" for k in worst]
        prefix = f"{err_msg}: " if err_msg else ""
        raise AssertionError(f"{prefix}{int(bad.sum())} of {bad.size} elements differ by more than their tolerance; worst:\n" + "\n".join(lines))


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    """Tests share two cores with each other and with other work."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"no MNIST under {DATA_ROOT} (set SALIENCY_ROBUSTNESS_DATA_ROOT)")
    return DATA_ROOT


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved random ``mnist_cnn`` on 8x8 images and a 12-image evaluation store (with class names)."""
    import numpy as np

    from saliency_robustness.data import MNIST_INPUT_SPACE, eval_dataset
    from saliency_robustness.models import build_model, save_model
    from saliency_robustness.stores import write_store

    root = tmp_path_factory.mktemp("tiny_experiment")
    spec = mnist_cnn_spec("gradnorm-lambda0", image_size=8)
    model_dir = root / "models" / spec.name
    model_dir.mkdir(parents=True)
    save_model(build_model(spec), spec, model_dir)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 10, (12,), generator=generator)
    names = [f"digit {i}" for i in range(10)]
    eval_ds = eval_dataset(images, labels, np.arange(100, 112), MNIST_INPUT_SPACE, class_names=names)
    write_store(eval_ds, root / "data" / "eval.zarr")
    return {"root": root, "model_dir": model_dir, "eval": root / "data" / "eval.zarr"}


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes protocol 2 as Python 2's cPickle did for CIFAR-10: ``bytes`` as Python 2 ``str``
    (read back as ``str`` with ``encoding="latin1"``), numpy's ``_reconstruct`` under its
    old module ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_fake_cifar10(
    data_root: Path, batch_size: int = 6, n_test: int = 8, seed: int = 0, pixel_range: tuple[int, int] = (0, 255)
) -> dict[str, object]:
    """A tiny CIFAR-10 in torchvision's layout ``<data_root>/cifar-10-batches-py/``: five train
    batches of ``batch_size`` images, a test batch of ``n_test``, ``batches.meta``; pickled like
    the real (Python 2) files, so torchvision's md5 check is all that tells them apart. Returns
    ``train_pixels``/``test_pixels`` (uint8 ``(N, 3, 32, 32)``, within ``pixel_range``),
    ``train_labels``/``test_labels`` and ``class_names``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = data_root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class-{i}" for i in range(10)]
    expected: dict[str, object] = {"class_names": names}
    for split, files, n in (("train", [f"data_batch_{i}" for i in range(1, 6)], batch_size), ("test", ["test_batch"], n_test)):
        pixels, labels = [], []
        for name in files:
            data = rng.integers(pixel_range[0], pixel_range[1] + 1, size=(n, 3072), dtype=np.uint8)
            batch_labels = [int(v) for v in rng.integers(0, 10, size=n)]
            entry = {b"batch_label": name.encode(), b"labels": batch_labels, b"data": data, b"filenames": [b"x.png"] * n}
            with (folder / name).open("wb") as f:
                _Python2Pickler(f, protocol=2).dump(entry)
            pixels.append(data.reshape(n, 3, 32, 32))
            labels.extend(batch_labels)
        expected[f"{split}_pixels"] = np.concatenate(pixels)
        expected[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
    with (folder / "batches.meta").open("wb") as f:
        meta = {b"num_cases_per_batch": batch_size, b"label_names": [n.encode() for n in names], b"num_vis": 3072}
        _Python2Pickler(f, protocol=2).dump(meta)
    return expected


@pytest.fixture
def fake_cifar10(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    """A data root under ``tmp_path`` holding a tiny fake CIFAR-10 (:func:`write_fake_cifar10`) and what it holds."""
    root = tmp_path / "cifar_root"
    return root, write_fake_cifar10(root)


def draw_figure(root: Path, models: list[str], figure: str) -> list[Path]:
    """Draw ``figure`` through the figure stage from the stores under ``root`` (``summary.zarr``,
    ``eval.zarr``, ``saliency/<model>.zarr``); return its PNG and PDF, both checked."""
    from saliency_robustness.stages.figures import figure_stage

    outputs = [root / "figures" / f"{figure}.png", root / "figures" / f"{figure}.pdf"]
    outputs[0].parent.mkdir(exist_ok=True)
    figure_stage(
        figure=figure,
        summary_store=root / "summary.zarr",
        eval_store=root / "eval.zarr",
        saliency_stores=[root / "saliency" / f"{m}.zarr" for m in models],
        outputs=outputs,
        options={"gallery_samples": 6, "dpi": 60, "subset": "all"},
        concordance_store=root / "concordance.zarr" if (root / "concordance.zarr").exists() else None,
    )
    assert outputs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[1].read_bytes()[:5] == b"%PDF-"
    return outputs


def source_attrs(model_dir: Path, eval_store: Path) -> dict[str, str]:
    """A fake per-model store's ``computed_from`` attribute, as the stages write it (the model
    directory gets the manifest a real one has)."""
    import json

    from saliency_robustness.stores import computed_from, write_manifest

    if not (model_dir / "manifest.json").exists():
        write_manifest(model_dir)
    return {"computed_from": json.dumps(computed_from(model_dir=model_dir, eval_store=eval_store))}
