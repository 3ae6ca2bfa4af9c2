"""Evaluation: metrics, scoring a split, `medplib eval` and its report, the pipeline report, gallery, plots.

- `metrics`: mask and answer metrics as MedPLIB reports them;
- `scoring`: a model answers a split by generation and is scored;
- `evaluate`: the `medplib eval` command around scoring; `eval_markdown`: its report.md;
- `pipeline_report`: the pipeline's goals table; `gallery`: best/worst grounding cases as PNGs;
- `training_plot`: `medplib plot LOG`; `volumes`: volume samples scored in 3-D.
"""
