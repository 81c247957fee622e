# one thread per job: with --cores all, jobs run side by side; two-thread torch jobs on
# shared cores were 5-10x slower (oversubscription). Raise with --set-threads train=8.
rule train:
    wildcard_constraints:
        model=TRAIN_PATTERN,
    output:
        directory(f"{RESULTS}/models/{{model}}"),
    params:
        settings=train_settings,
        resume_file=resume_file,
        version=train_version,
    log:
        f"{LOGS}/train/{{model}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/train.py"


# train.ensemble: the grid's gradnorm models in one job (stages/training.train_ensemble_stage);
# changing one lambda retrains them all
if ENSEMBLE:

    rule train_ensemble:
        output:
            [directory(f"{RESULTS}/models/{m}") for m in ENSEMBLE],
        params:
            settings=[model_settings(m) for m in ENSEMBLE],
            version=stage_version("train_ensemble", models=[model_settings(m) for m in ENSEMBLE]),
        log:
            f"{LOGS}/train/ensemble.log",
        threads: 1
        resources:
            mem_mb=16000,
            runtime=480,
            gpu=1,
        conda:
            ENV
        script:
            "../scripts/train_ensemble.py"


# models.external: checkpoints the pipeline analyses without training (stages/external.py)
rule external:
    wildcard_constraints:
        model=EXTERNAL_NAME_PATTERN,
    input:
        eval=ancient(EVAL_STORE),  # read for the input space and a check of the logits only
    output:
        directory(f"{RESULTS}/models/{{model}}"),
    params:
        settings=external_settings,
        version=external_version,
    log:
        f"{LOGS}/external/{{model}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/external.py"
