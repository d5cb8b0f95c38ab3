"""Entry point: compose the config with Hydra and run one continual experiment.

    python train.py                                   # the default experiment (SmolLM2-135M, mini_trace, OPR)
    python train.py method=vanilla_replay budget=0.1 seed=1
    python train.py -m method=seq_sft,opr seed=0,1,2   # a sweep (local, or SLURM with hydra/launcher=...)
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("opr")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from opr.backbones import BackboneError
    from opr.config import ConfigError
    from opr.loop import StageDiverged
    from opr.run import run_experiment

    try:
        results = run_experiment(cfg)
    except (ConfigError, BackboneError, StageDiverged) as err:
        log.error("%s", err)
        sys.exit(2)
    return float(results["metrics"]["OP"])  # the value a Hydra sweeper optimises


if __name__ == "__main__":
    main()
