"""Continual-learning methods, one small module each.

A method says how a stage's training data (or loss) is built: ``stage_data(ctx)`` returns the stage's
:class:`StageData`, and ``train_stage(ctx, data)`` trains on it (SFT methods use the shared
:func:`train_sft`). The loop, trainer, rollout and evaluation are shared and never re-implemented here.
"""
