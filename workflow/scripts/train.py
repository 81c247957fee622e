"""Train one model of the grid into models/<model>/ (from the base model with train.init base)."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.training import model_spec, train_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    settings = sm.params.settings
    train_stage(
        spec=model_spec(**settings),
        dataset=settings["dataset"],
        train=settings["train"],
        data_root=sm.config["data_root"],  # where the data lives: not a param, so moving it retrains nothing
        output=sm.output[0],
        resume_file=sm.params.resume_file,
        resume_key=sm.params.version,
        base_dir=sm.input.get("base"),
        base_spec=model_spec(**settings["base"]) if settings["base"] else None,
    )
