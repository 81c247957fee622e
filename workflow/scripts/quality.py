"""Explanation-quality measures of every attribution map of one model into quality/<model>.zarr."""

from saliency_robustness.attributions import AttributionOptions
from saliency_robustness.runtime import script_main
from saliency_robustness.stages.quality import QualityOptions, quality_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    quality_stage(
        model_dir=sm.input.model,
        eval_store=sm.input.eval,
        saliency_store=sm.input.saliency,
        output=sm.output[0],
        options=QualityOptions.from_config(sm.params.options),
        attributions=AttributionOptions.from_config(sm.params.attributions),
    )
