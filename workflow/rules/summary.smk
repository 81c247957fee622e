rule summary:
    input:
        unpack(summary_inputs),
    output:
        zarr=directory(f"{RESULTS}/summary.zarr"),
        csv=f"{RESULTS}/summary.csv",
    params:
        models=list(MODELS),
        version=stage_version("summary"),
    log:
        f"{LOGS}/summary.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    script:
        "../scripts/summary.py"
