"""Adversarial robustness and saliency-map alignment (Etmann et al., ICML 2019)."""

from saliency_robustness.metrics import compute_metrics
from saliency_robustness.models import load_model
from saliency_robustness.saliency import compute_saliency

__version__ = "0.1.0"

__all__ = ["__version__", "compute_metrics", "compute_saliency", "load_model"]
