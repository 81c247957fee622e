"""One attack on one model into attacks/<model>/<attack>.zarr."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.attacks import attack_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    attack_stage(
        model_dir=sm.input.model,
        eval_store=sm.input.eval,
        output=sm.output[0],
        settings=sm.params.settings,
        start_stores=list(sm.input.get("starts", [])),
    )
