rule metrics:
    input:
        unpack(metrics_inputs),
    output:
        directory(metrics_store("{model}")),
    params:
        attacks=ATTACK_NAMES,
        batch_size=config["metrics"]["batch_size"],
        class_chunk=config["metrics"]["class_chunk"],
        version=stage_version("metrics", **config["metrics"]),
    log:
        f"{LOGS}/metrics/{{model}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/metrics.py"
