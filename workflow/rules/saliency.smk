rule saliency:
    input:
        model=model_dir("{model}"),
        eval=EVAL_STORE,
    output:
        directory(saliency_store("{model}")),
    params:
        batch_size=config["saliency"]["batch_size"],
        attributions=canonical(config["saliency"]),
        version=stage_version("saliency", **config["saliency"]),
    log:
        f"{LOGS}/saliency/{{model}}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/saliency.py"
