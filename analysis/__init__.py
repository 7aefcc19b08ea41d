"""analysis/: records -> tidy table -> per-experiment tables, Pareto fronts and the paper's figures.

Reads only run records (``harness.orchestration.records``) and the JSON of ``harness.evaluation.token_importance`` /
``harness.measurement.overheads``. Command lines (``python -m analysis <command> --help`` for details)::

    python -m analysis collate results/records --all-csv results/tables/all.csv \\
        [--perplexity-csv results/tables/perplexity.csv --perplexity-md results/tables/perplexity.md]
    python -m analysis table --table results/tables/all.csv --experiment table1_sft \\
        --csv results/tables/table1_sft.csv --md results/tables/table1_sft.md
        (experiments: table1_sft table2_cpt table3_eviction_stack table4_middle_ratio table5_expert_count
         table6_router table11_ratio_grid figure3_budget_sweep, any other name or "all": method x budget)
    python -m analysis pareto --table results/tables/all.csv --csv results/tables/pareto.csv \\
        --md results/tables/pareto.md --kv-figure results/figures/pareto_kv.png \\
        --latency-figure results/figures/pareto_latency.png [--experiment main] [--quality ppl_token]
    python -m analysis figure3 --table results/tables/all.csv --out results/figures/figure3_budget_sweep.png \\
        [--csv results/tables/figure3_budget_sweep.csv --md results/tables/figure3_budget_sweep.md]
    python -m analysis figure1 --json results/token_importance.json --out results/figures/figure1_token_importance.png
    python -m analysis table9 --json results/overheads.json --csv results/tables/table9_overheads.csv \\
        --md results/tables/table9_overheads.md
    python -m analysis perf --table results/tables/all.csv --csv results/tables/perf.csv \\
        --md results/tables/perf.md [--figure results/figures/perf.png]
    python -m analysis plot-perplexity --table results/tables/all.csv --out results/figures/perplexity.png
    python -m analysis recovery results/records/*__cpt__*.json --csv results/tables/recovery_curves.csv \\
        --md results/tables/recovery_curves.md --figure results/figures/recovery_curves.png

Every command exits 2 with ``error: <reason>`` on missing inputs or data it cannot use.
"""
