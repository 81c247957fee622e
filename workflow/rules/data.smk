rule data:
    output:
        directory(f"{RESULTS}/data/eval.zarr"),
    params:
        dataset=canonical(config["dataset"]),
        version=stage_version("data", dataset=config["dataset"]),
    log:
        f"{LOGS}/data.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/data.py"
