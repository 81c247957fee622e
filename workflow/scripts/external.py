"""An external model (models.external) into models/<model>/, without training.

Where its weights and the data live comes from the config, not from params: moving them
reruns nothing; their content hash is in the params."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.external import external_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    settings = sm.params.settings
    external_stage(
        entry=next(e for e in sm.config["models"]["external"] if e["name"] == sm.wildcards.model),
        dataset=settings["dataset"],
        data_root=sm.config["data_root"],
        eval_store=sm.input.eval,
        output=sm.output[0],
        weights_sha256=settings["weights_sha256"],
    )
