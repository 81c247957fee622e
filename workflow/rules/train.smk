rule train:
    output:
        directory(f"{RESULTS}/models/{{model}}"),
    params:
        settings=train_settings,
        data_root=config["data_root"],
        resume_file=resume_file,
        version=train_version,
    log:
        f"{LOGS}/train/{{model}}.log",
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/train.py"
