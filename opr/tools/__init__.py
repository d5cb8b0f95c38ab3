"""Command-line tools over the library, each module a script (``python -m opr.tools.<name> --help``):
``report`` (a package: compare runs, tables, plots), ``wandb_dashboard`` (the W&B workspace and report from
code), ``analyze`` (drift between checkpoints, singular-vector edits), ``score`` (re-score saved generations)
and ``bench/`` (SFT and rollout throughput, a run's wall-time split,
scaling, sweep cost, the GPU check's table). Tools import the library; the library does not import tools
(one exception: the script ``opr.analysis.teacher_signal`` prints with ``bench.common.table``)."""
