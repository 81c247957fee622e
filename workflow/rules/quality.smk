rule quality:
    input:
        model=model_dir("{model}"),
        eval=EVAL_STORE,
        saliency=saliency_store("{model}"),
    output:
        directory(quality_store("{model}")),
    params:
        options=canonical(QUALITY),
        attributions=canonical(config["saliency"]),
        version=stage_version("quality", quality=QUALITY, saliency=config["saliency"]),
    log:
        f"{LOGS}/quality/{{model}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/quality.py"


rule concordance:
    input:
        summary=f"{RESULTS}/summary.zarr",
        quality=[quality_store(m) for m in MODELS],
    output:
        zarr=directory(f"{RESULTS}/concordance.zarr"),
        csv=f"{RESULTS}/summary_concordance.csv",
        quality_csv=f"{RESULTS}/summary_quality.csv",
    params:
        models=list(MODELS),
        options=canonical(config["summary"]),
        version=stage_version("concordance", **config["summary"]),
    log:
        f"{LOGS}/concordance.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/concordance.py"
