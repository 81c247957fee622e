rule summary:
    input:
        unpack(summary_inputs),
    output:
        zarr=directory(f"{RESULTS}/summary.zarr"),
        csv=f"{RESULTS}/summary.csv",
        grid_csv=f"{RESULTS}/summary_grid.csv",
        trends_csv=f"{RESULTS}/summary_trends.csv",
    params:
        models=list(MODELS),
        attributes=model_attributes(),
        options=canonical(config["summary"]),
        version=stage_version("summary", **config["summary"]),
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
