"""Losses as pure functions: SFT (``sft``), self-distillation (``distill``), policy gradient (``policy``)."""
