"""Shared fixtures: repository paths, the offline MNIST copy, small models."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports git

REPO = Path(__file__).resolve().parents[1]
# the offline MNIST copy beside the checkout; SALIENCY_ROBUSTNESS_DATA_ROOT overrides it
DATA_ROOT = Path(os.environ.get("SALIENCY_ROBUSTNESS_DATA_ROOT", REPO.parent / "shared" / "data"))


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
    from saliency_robustness.models import ModelSpec, build_model, save_model
    from saliency_robustness.stores import write_store

    root = tmp_path_factory.mktemp("tiny_experiment")
    spec = ModelSpec(name="gradnorm-lambda0", architecture="mnist_cnn", lam=0.0, image_size=8)
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
    )
    assert outputs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[1].read_bytes()[:5] == b"%PDF-"
    return outputs
