"""Which figures the workflow draws, by name: the Snakefile's list of figures.

A base module without any plotting library, so that the Snakefile can read the list without
importing matplotlib; ``stages.figures`` maps each name to the function that draws it, in this
order, and refuses to import when the two lists differ.
"""

from __future__ import annotations

from collections.abc import Iterable

from saliency_robustness.vocabulary import GRADNORM

#: every figure the workflow draws, in the order the report lists them
FIGURE_NAMES = (
    "saliency_gallery",
    "alignment_vs_robustness",
    "linearized_vs_robustness",
    "homogeneity_vs_robustness",
    "accuracy_robustness_vs_lambda",
    "alignment_vs_robustness_per_image",
    "bound_decomposition",
    "decomposition_terms",
    "attribution_alignment_vs_robustness",
    "quality_concordance",
)

#: the figures drawn against lambda: only gradient-norm models have one
LAMBDA_FIGURES = frozenset({"accuracy_robustness_vs_lambda", "decomposition_terms"})
#: the figures of the explanation-quality measures (config ``quality.enabled``), drawn from concordance.zarr
QUALITY_FIGURES = frozenset({"quality_concordance"})


def figures_for(methods: Iterable[str], *, quality: bool) -> list[str]:
    """The figures of an experiment whose models come from ``methods`` (gradnorm, adversarial,
    external): all of them, but those against lambda only with gradient-norm models, and those
    of the explanation-quality measures only when ``quality`` is on."""
    methods = set(methods)
    return [
        name
        for name in FIGURE_NAMES
        if (name not in LAMBDA_FIGURES or GRADNORM in methods) and (name not in QUALITY_FIGURES or quality)
    ]
