"""Adversarial robustness and saliency-map alignment (Etmann et al., ICML 2019)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# imported on first use, so that parsing the Snakefile (which imports the config module)
# does not pay for torch
_LAZY = {
    "compute_metrics": "saliency_robustness.stages.metrics",
    "compute_saliency": "saliency_robustness.stages.saliency",
    "load_model": "saliency_robustness.models",
    "open_store": "saliency_robustness.stores",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saliency_robustness' has no attribute {name!r}")
