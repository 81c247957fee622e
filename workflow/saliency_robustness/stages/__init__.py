"""The pipeline's stages, one module each, in the order the workflow runs them.

``training`` -> ``saliency`` -> ``attacks`` -> ``metrics`` -> ``summary`` -> ``figures``

A stage reads the stores of earlier stages and writes its own; it imports the base modules
of :mod:`saliency_robustness` (evaluation, ensemble, robustness, models, data, stores, ...),
never another stage (``tests/test_layering.py``).
"""
