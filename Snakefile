# mixSGA-bench: the workflow entry point.
#
#   snakemake --cores all                                # offline default (config/config.yaml)
#   snakemake --cores all --configfile config/paper.yaml # paper profile (GPU, hub checkpoints)
#   snakemake -n                                         # list the grid's jobs
#
#   snakemake --cores all table1_sft                     # one experiment's target (see README "Targets")
#   snakemake --cores all report                         # results/report.html (snakemake --report)
#
# The config is validated (and completed with defaults) against
# workflow/schemas/config.schema.yaml before any job is built. Its experiments are
# expanded once into runs (shared runs once) in workflow/rules/common.smk.
# Rules stay thin: each calls one `python -m harness ...` / `python -m analysis ...`.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizer.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/runs.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/targets.smk"


report: "workflow/report/workflow.rst"


rule all:
    input:
        all_targets(),
    default_target: True
