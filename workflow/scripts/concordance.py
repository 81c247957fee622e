"""Per-model medians of the explanation-quality scores and the concordance of the model rankings they give
with alignment and robustness: concordance.zarr, summary_concordance.csv and summary_quality.csv."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.concordance import concordance_stage
from saliency_robustness.statistics import BootstrapOptions

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    concordance_stage(
        models=sm.params.models,
        summary_store=sm.input.summary,
        quality_stores=list(sm.input.quality),
        output_zarr=sm.output.zarr,
        output_csv=sm.output.csv,
        output_quality_csv=sm.output.quality_csv,
        options=BootstrapOptions.from_config(sm.params.options),
    )
