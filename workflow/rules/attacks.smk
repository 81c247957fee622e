rule attack:
    input:
        unpack(attack_inputs),
    output:
        directory(attack_store("{model}", "{attack}")),
    params:
        settings=attack_settings,
        version=attack_version,
    log:
        f"{LOGS}/attacks/{{model}}/{{attack}}.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=1,
    conda:
        ENV
    script:
        "../scripts/attack.py"
