"""Every per-image quantity of docs/spec.md §2 for one model into metrics/<model>.zarr."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.metrics import metrics_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    metrics_stage(
        model_dir=sm.input.model,
        eval_store=sm.input.eval,
        saliency_store=sm.input.saliency,
        attack_stores=dict(zip(sm.params.attacks, sm.input.attacks)),
        output=sm.output[0],
        batch_size=sm.params.batch_size,
        class_chunk=sm.params.class_chunk,
    )
