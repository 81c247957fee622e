"""Stack every model's metrics into summary.zarr with its statistics, and write its three CSV tables."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.summary import summary_stage
from saliency_robustness.statistics import BootstrapOptions

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    summary_stage(
        models=sm.params.models,
        metrics_stores=list(sm.input.metrics),
        model_dirs=list(sm.input.models),
        output_zarr=sm.output.zarr,
        output_csv=sm.output.csv,
        output_grid_csv=sm.output.grid_csv,
        output_trends_csv=sm.output.trends_csv,
        options=BootstrapOptions.from_config(sm.params.options),
        attributes=sm.params.attributes,
    )
