"""Print the memory plan of a run before launching it (:mod:`opr.memory_plan`).

    python -m opr.tools.plan --gpus 8 --gpu-gb 80 experiment=trace_7b backbone=qwen2_5_7b_instruct method=opr
    python -m opr.tools.plan --gpus 1 --gpu-gb 24 backbone=smollm2_135m          # the default run on one GPU

The overrides are ``train.py``'s (composed and validated the same way); the model's shape comes from
``backbone.path``'s ``config.json`` when that is a folder, else from the preset's published shape. The last
line reads ``peak per GPU: X GB (fits|does not fit in G GB)``; the exit status is 1 when it does not fit.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from opr.config import ConfigError, validate
from opr.memory_plan import plan, shape_for

CONF = Path(__file__).resolve().parents[2] / "conf"


def build_plan(overrides: Sequence[str], gpus: int, gpu_gb: float | None, nodes: int = 1):
    """The plan of the config that ``overrides`` compose (as ``train.py`` composes them)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "run_dir=/tmp/opr-plan"])
    cfg = validate(cfg)
    node = OmegaConf.to_container(cfg, resolve=True)
    shape = shape_for(node["backbone"]["name"], node["backbone"].get("path"))
    return plan(node, shape, gpus=gpus, gpu_gb=gpu_gb, nodes=nodes), shape


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) in all")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpu-gb", type=float, default=None, help="memory of one GPU in GB (80 for an 80 GB H100)")
    ap.add_argument("overrides", nargs="*", help="train.py overrides, e.g. engine=deepspeed engine.zero_stage=3")
    args = ap.parse_args(argv)
    if args.gpus < 1 or args.nodes < 1 or args.gpus % args.nodes:
        print(f"--gpus ({args.gpus}) must be a positive multiple of --nodes ({args.nodes})", file=sys.stderr)
        return 2
    try:
        result, shape = build_plan(args.overrides, args.gpus, args.gpu_gb, args.nodes)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model: {shape.params / 1e9:.2f} B parameters ({shape.layers} layers, hidden {shape.hidden}, "
          f"vocab {shape.vocab}); {args.gpus} GPU(s) on {args.nodes} node(s)")
    print(result.table())
    return 0 if result.fits() is not False else 1


if __name__ == "__main__":
    sys.exit(main())
