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
