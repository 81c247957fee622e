# Robustness vs. saliency-map alignment (Etmann et al., ICML 2019).
# Run:  snakemake --cores all [--configfile config/<experiment>.yaml] [--config data_root=...]
import sys

from snakemake.utils import min_version

min_version("9.0")

# this checkout's package, not another copy an environment may hold (a non-editable install,
# a second clone): its jobs run, and its source is fingerprinted, from workflow/ here
sys.path.insert(0, f"{workflow.basedir}/workflow")


# the default experiment, unless --configfile names another (which then stands alone
# instead of being merged over the default)
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/saliency.smk"
include: "workflow/rules/attacks.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/quality.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/figures.smk"


# small CPU jobs run in Snakemake's own process, also on a cluster
localrules:
    all,
    summary,
    concordance,
    figure,


rule all:
    input:
        final_targets(),
    default_target: True
