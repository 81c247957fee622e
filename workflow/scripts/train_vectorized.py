"""Train the grid's gradnorm models as one vectorised stack into models/<model>/ each (train.vectorized)."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.training import model_spec, train_vectorized_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    settings = sm.params.settings
    train_vectorized_stage(
        specs=[model_spec(**s) for s in settings],
        dataset=settings[0]["dataset"],
        trains=[s["train"] for s in settings],
        data_root=sm.config["data_root"],  # where the data lives: not a param, so moving it retrains nothing
        outputs=list(sm.output),
    )
