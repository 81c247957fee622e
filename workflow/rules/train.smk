# one thread per job: with --cores all, jobs run side by side; two-thread torch jobs on
# shared cores were 5-10x slower (oversubscription). Raise with --set-threads train=8.
rule train:
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
