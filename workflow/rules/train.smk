# one thread per job: with --cores all, jobs run side by side; two-thread torch jobs on
# shared cores were 5-10x slower (oversubscription). Raise with --set-threads train=8.
rule train:
    wildcard_constraints:
        model=TRAIN_PATTERN,
    input:
        unpack(train_inputs),
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


# train.init base: the base model every grid model fine-tunes (stages/training.pretrain_stage)
if BASE_INIT:

    rule pretrain:
        output:
            directory(model_dir(BASE_MODEL)),
        params:
            settings=base_settings(),
            resume_file=f"{RESULTS}/models/.resume/{BASE_MODEL}.pt",
            version=stage_version("pretrain", **base_settings()),
        log:
            f"{LOGS}/train/{BASE_MODEL}.log",
        threads: pretrain_threads()
        resources:
            mem_mb=8000,
            runtime=480,
            gpu=1,
        conda:
            ENV
        script:
            "../scripts/pretrain.py"


# train.vectorized: the grid's gradnorm models in one job (stages/training.train_vectorized_stage);
# changing one lambda retrains them all
if VECTORIZED:

    rule train_vectorized:
        output:
            [directory(f"{RESULTS}/models/{m}") for m in VECTORIZED],
        params:
            settings=[model_settings(m) for m in VECTORIZED],
            version=stage_version("train_vectorized", models=[model_settings(m) for m in VECTORIZED]),
        log:
            f"{LOGS}/train/vectorized.log",
        threads: 1
        resources:
            mem_mb=16000,
            runtime=480,
            gpu=1,
        conda:
            ENV
        script:
            "../scripts/train_vectorized.py"


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
