"""Shared fixtures: repository paths, the offline MNIST copy, small models."""

from __future__ import annotations

import os
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
