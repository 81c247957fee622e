"""Draw one figure (PNG and PDF)."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.figures import figure_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    figure_stage(
        figure=sm.wildcards.figure,
        summary_store=sm.input.summary,
        eval_store=sm.input.eval,
        saliency_stores=list(sm.input.saliency),
        outputs=[sm.output.png, sm.output.pdf],
        options=sm.params.options,
        concordance_store=sm.input.get("concordance"),
    )
