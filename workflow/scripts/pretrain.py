"""Train the base model that every grid model fine-tunes (train.init base) into models/base/."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.training import model_spec, pretrain_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    settings = sm.params.settings
    pretrain_stage(
        spec=model_spec(**settings),
        dataset=settings["dataset"],
        train=settings["train"],
        data_root=sm.config["data_root"],
        output=sm.output[0],
        resume_file=sm.params.resume_file,
        resume_key=sm.params.version,
    )
