"""Train the grid's gradnorm models as one vectorised ensemble into models/<model>/ each (train.ensemble)."""

from saliency_robustness.runtime import script_main
from saliency_robustness.stages.training import model_spec, train_ensemble_stage

with script_main(snakemake) as sm:  # noqa: F821 (injected by Snakemake)
    settings = sm.params.settings
    train_ensemble_stage(
        specs=[model_spec(s["name"], s["lam"], s["dataset"], s["model"], s["train"], method=s["method"], epsilon=s["epsilon"]) for s in settings],
        dataset=settings[0]["dataset"],
        trains=[s["train"] for s in settings],
        data_root=sm.config["data_root"],  # where the data lives: not a param, so moving it retrains nothing
        outputs=list(sm.output),
    )
