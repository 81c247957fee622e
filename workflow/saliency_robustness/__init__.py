"""Adversarial robustness and saliency-map alignment (Etmann et al., ICML 2019)."""

from saliency_robustness.models import load_model

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]
