"""Training engines: ``torch`` (single process) and ``deepspeed`` (ZeRO, many processes).

Both implement :class:`opr.engine.base.Trainer`, the contract the loop and the methods train through.
"""

from opr.engine.base import NonFiniteLoss, Trainer, TrainStats

__all__ = ["NonFiniteLoss", "TrainStats", "Trainer"]
