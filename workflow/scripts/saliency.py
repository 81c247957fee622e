"""Saliency maps of one model into saliency/<model>.zarr."""

from saliency_robustness.attributions import AttributionOptions
from saliency_robustness.runtime import script_main
from saliency_robustness.stages.saliency import saliency_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    saliency_stage(
        model_dir=sm.input.model,
        eval_store=sm.input.eval,
        output=sm.output[0],
        batch_size=sm.params.batch_size,
        attributions=AttributionOptions.from_config(sm.params.attributions),
    )
